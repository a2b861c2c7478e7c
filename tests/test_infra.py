"""infra/: the Bicep parses and grants what the design needs; checkov passes on it and on the
worker Dockerfile; the Dockerfile's health check really probes ``GET /healthz``.

Bicep is parsed with pycep (``pycep-parser``); checkov runs from its own venv, which
``scripts/setup.d/20-infra-tools.sh`` installs. A checkov finding that must stay is skipped
only with a reason, inside the resource it concerns: ``// checkov:skip=CKV_AZURE_74:why`` in
Bicep, ``# checkov:skip=CKV_DOCKER_2:why`` in the Dockerfile; a skip without a reason fails.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pycep import BicepParser

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
DOCKERFILE = INFRA / "worker.Dockerfile"
CHECKOV = ROOT / ".venv-checkov" / "bin" / "checkov"
SETUP_SCRIPT = "scripts/setup.d/20-infra-tools.sh"

SERVICE_BUS_SENDER = "69a216fc-b8fb-44d8-bc22-1f3c2cd27a39"
SERVICE_BUS_RECEIVER = "4f6d3b9b-027b-4f4c-9142-0e5a2a2247e0"
SERVICE_BUS_OWNER = "090c5cfd-751d-490a-894a-3ce6f1109419"

# What a Microsoft.Kusto/clusters/databases/scripts resource may run.
KUSTO_SCRIPT_VERBS = (
    ".create",
    ".create-or-alter",
    ".create-merge",
    ".alter",
    ".alter-merge",
    ".add",
)

HEALTH_ENV = "LANGGRAPH_KUSTO_HEALTH_PORT"


# ---------------------------------------------------------------------------------------
# Parsed Bicep and small helpers to read pycep's JSON
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bicep() -> dict[str, dict[str, Any]]:
    """Every .bicep file under infra/, parsed, keyed by its path relative to infra/."""
    parser = BicepParser()
    return {
        path.relative_to(INFRA).as_posix(): dict(parser.parse(file_path=path))
        for path in sorted(INFRA.rglob("*.bicep"))
    }


def resources_of_type(document: dict[str, Any], type_: str) -> dict[str, dict[str, Any]]:
    return {
        name: resource
        for name, resource in document.get("resources", {}).items()
        if resource["type"].lower() == type_.lower() and not resource["existing"]
    }


def body(resource: dict[str, Any]) -> dict[str, Any]:
    """The resource's object, looking through a for-loop or an if-condition."""
    config = resource["config"]
    return config["config"] if "loop_type" in config or "condition" in config else config


def loop_array(resource: dict[str, Any]) -> str | None:
    loop = resource["config"].get("loop_type")
    return loop["detail"]["array_name"] if loop else None


def dotted(value: Any) -> str | None:
    """A property access such as ``a.b.c`` as text; None for anything else."""
    if isinstance(value, dict) and value.get("operator", {}).get("type") == "property_accessor":
        parts = [
            part if isinstance(part, str) else dotted(part)
            for part in value["operator"]["operands"].values()
        ]
        if all(parts):
            return ".".join(parts)  # type: ignore[arg-type]
    return None


def variable(document: dict[str, Any], reference: Any) -> Any:
    """Resolve a variable name or ``var.key`` to its literal value; other values pass through."""
    variables = {name: entry["value"] for name, entry in document.get("variables", {}).items()}
    path = dotted(reference)
    if path:
        name, _, key = path.partition(".")
        return variables[name][key]
    return variables.get(reference, reference) if isinstance(reference, str) else reference


def role_of(document: dict[str, Any], assignment: dict[str, Any]) -> str:
    role_id = body(assignment)["properties"]["roleDefinitionId"]["function"]
    assert role_id["type"] == "subscription_resource_id"
    assert role_id["parameters"]["resource_type"] == "Microsoft.Authorization/roleDefinitions"
    return variable(document, role_id["parameters"]["resource_name_1"])


def param_default(document: dict[str, Any], name: str) -> Any:
    return document["parameters"][name].get("default")


def module_params(main: dict[str, Any], module: str) -> dict[str, Any]:
    return flatten(main["modules"][module]["config"]["params"])


def flatten(value: Any) -> Any:
    """pycep keeps ``a.b.c`` as nested accessors; render them as dotted text for comparisons."""
    path = dotted(value)
    if path:
        return path
    if isinstance(value, list):
        return [flatten(item) for item in value]
    if isinstance(value, dict):
        return {key: flatten(item) for key, item in value.items()}
    return value


def iso_duration_seconds(text: str) -> float:
    match = re.fullmatch(r"P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?)?", text)
    assert match and text not in ("P", "PT"), f"not an ISO 8601 duration: {text}"
    days, hours, minutes, seconds = (float(part or 0) for part in match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


# ---------------------------------------------------------------------------------------
# Bicep: structure
# ---------------------------------------------------------------------------------------


def test_every_bicep_file_parses_and_every_module_is_wired(bicep):
    assert "main.bicep" in bicep
    modules = bicep["main.bicep"]["modules"]
    referenced = {(INFRA / m["detail"]["path"]).resolve() for m in modules.values()}
    on_disk = {(INFRA / name).resolve() for name in bicep if name != "main.bicep"}
    assert referenced == on_disk, "every module file is used by main.bicep, and exists"
    for name, document in bicep.items():
        assert document.get("resources") or document.get("modules"), f"{name} deploys nothing"


def test_parameters_cover_names_skus_and_location(bicep):
    parameters = bicep["main.bicep"]["parameters"]
    for name in (
        "namePrefix",
        "location",
        "serviceBusNamespaceName",
        "queueName",
        "serviceBusSku",
        "kustoClusterName",
        "kustoDatabaseName",
        "kustoSkuName",
        "kustoCapacity",
        "workerImage",
        "workerMinReplicas",
        "workerMaxReplicas",
    ):
        assert name in parameters, f"main.bicep lacks parameter {name}"
    for name, parameter in parameters.items():
        described = any(d["type"] == "description" for d in parameter.get("decorators", []))
        assert described, f"parameter {name} has no @description"


def test_outputs_give_the_queue_url_and_cluster_uri(bicep):
    outputs = bicep["main.bicep"]["outputs"]
    assert {"queueUrl", "clusterUri", "databaseName"} <= set(outputs)
    # The URL the saver and worker take: sb://<namespace>.servicebus.windows.net/<queue>.
    queue_url = bicep["modules/servicebus.bicep"]["outputs"]["queueUrl"]["value"]
    assert "sb://" in json.dumps(queue_url)
    assert "serviceBusEndpoint" in json.dumps(queue_url)


# ---------------------------------------------------------------------------------------
# Service Bus
# ---------------------------------------------------------------------------------------


def test_queue_has_sessions_duplicate_detection_and_dead_lettering(bicep):
    document = bicep["modules/servicebus.bicep"]
    (queue,) = resources_of_type(document, "Microsoft.ServiceBus/namespaces/queues").values()
    properties = body(queue)["properties"]
    assert properties["requiresSession"] is True
    assert properties["requiresDuplicateDetection"] is True
    assert properties["deadLetteringOnMessageExpiration"] is True
    for key in ("duplicateDetectionHistoryTimeWindow", "maxDeliveryCount", "lockDuration"):
        assert properties.get(key), f"queue does not set {key}"

    main = bicep["main.bicep"]
    window = iso_duration_seconds(param_default(main, "duplicateDetectionWindow"))
    assert 20 <= window <= 7 * 24 * 3600, "Service Bus allows 20 s to 7 days"
    assert iso_duration_seconds(param_default(main, "lockDuration")) <= 300, "lock <= 5 min"
    assert param_default(main, "maxDeliveryCount") == 10
    assert param_default(main, "serviceBusSku") in ("Standard", "Premium"), "Basic has no sessions"


def test_service_bus_accepts_entra_id_only(bicep):
    document = bicep["modules/servicebus.bicep"]
    (namespace,) = resources_of_type(document, "Microsoft.ServiceBus/namespaces").values()
    properties = body(namespace)["properties"]
    assert properties["disableLocalAuth"] is True, "no SAS keys: managed identities only"
    assert properties["minimumTlsVersion"] == "1.2"
    assert not resources_of_type(document, "Microsoft.ServiceBus/namespaces/AuthorizationRules")


def test_service_bus_roles_are_least_privilege_and_on_the_queue(bicep):
    document = bicep["modules/servicebus.bicep"]
    assignments = resources_of_type(document, "Microsoft.Authorization/roleAssignments")
    grants = sorted((loop_array(a), role_of(document, a)) for a in assignments.values())
    assert grants == sorted(
        [
            ("senderPrincipalIds", SERVICE_BUS_SENDER),
            ("receiverPrincipalIds", SERVICE_BUS_RECEIVER),
            # KEDA reads queue runtime properties, which needs Manage: the platform identity.
            ("scalerPrincipalIds", SERVICE_BUS_OWNER),
            # Operators replay dead letters: receive them, send them back.
            ("operators", SERVICE_BUS_RECEIVER),
            ("operators", SERVICE_BUS_SENDER),
        ]
    )
    for name, assignment in assignments.items():
        assert body(assignment)["scope"] == "queue", f"{name} is not scoped to the queue"

    granted = module_params(bicep["main.bicep"], "serviceBus")
    assert granted["senderPrincipalIds"] == ["appIdentity.properties.principalId"]
    assert granted["receiverPrincipalIds"] == ["workerIdentity.properties.principalId"]
    assert granted["scalerPrincipalIds"] == ["platformIdentity.properties.principalId"]


# ---------------------------------------------------------------------------------------
# Azure Data Explorer
# ---------------------------------------------------------------------------------------


def test_kusto_cluster_streams_and_the_schema_is_provision_kql(bicep):
    document = bicep["modules/kusto.bicep"]
    (cluster,) = resources_of_type(document, "Microsoft.Kusto/clusters").values()
    assert body(cluster)["properties"]["enableStreamingIngest"] is True
    assert resources_of_type(document, "Microsoft.Kusto/clusters/databases")

    (script,) = resources_of_type(document, "Microsoft.Kusto/clusters/databases/scripts").values()
    properties = body(script)["properties"]
    assert properties["continueOnErrors"] is False
    content = variable(document, properties["scriptContent"])
    assert content["function"]["type"] == "load_text_content"
    path = content["function"]["parameters"]["file_path"]
    assert (INFRA / "modules" / path).resolve() == (ROOT / "provision.kql").resolve()
    # The script re-runs whenever provision.kql changes.
    assert "schemaScript" in json.dumps(properties["forceUpdateTag"])


def provision_commands() -> list[str]:
    text = (ROOT / "provision.kql").read_text()
    blocks = re.split(r"\n\s*\n", text)
    commands = []
    for block in blocks:
        lines = [line for line in block.splitlines() if not line.strip().startswith("//")]
        command = "\n".join(lines).strip()
        if command:
            commands.append(command)
    return commands


def test_provision_kql_only_uses_commands_a_database_script_may_run():
    commands = provision_commands()
    assert commands, "provision.kql is empty"
    for command in commands:
        verb = command.split(maxsplit=1)[0]
        assert verb in KUSTO_SCRIPT_VERBS, (
            f"{verb} cannot run in a Kusto database script (infra applies provision.kql "
            f"that way); allowed: {', '.join(KUSTO_SCRIPT_VERBS)}"
        )


def test_kusto_roles_worker_ingests_apps_and_readers_view(bicep):
    document = bicep["modules/kusto.bicep"]
    assignments = resources_of_type(
        document, "Microsoft.Kusto/clusters/databases/principalAssignments"
    )
    role_by_principals = {
        loop_array(a): body(a)["properties"]["role"] for a in assignments.values()
    }
    assert role_by_principals == {
        "ingestorClientIds": "Ingestor",
        "viewerClientIds": "Viewer",
        "viewers": "Viewer",
    }
    assert not resources_of_type(document, "Microsoft.Kusto/clusters/principalAssignments"), (
        "no cluster-wide roles"
    )

    granted = module_params(bicep["main.bicep"], "kusto")
    assert granted["ingestorClientIds"] == ["workerIdentity.properties.clientId"]
    assert granted["viewerClientIds"] == ["appIdentity.properties.clientId"]


# ---------------------------------------------------------------------------------------
# The worker on Container Apps
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker_app(bicep) -> dict[str, Any]:
    document = bicep["modules/worker.bicep"]
    (app,) = resources_of_type(document, "Microsoft.App/containerApps").values()
    return body(app)


def test_keda_scales_the_worker_on_queue_length_with_an_identity(worker_app):
    scale = worker_app["properties"]["template"]["scale"]
    (rule,) = scale["rules"]
    custom = rule["custom"]
    assert custom["type"] == "azure-servicebus"
    assert {"namespace", "queueName", "messageCount"} <= set(custom["metadata"])
    assert custom["identity"] == "platformIdentityId", "managed identity, not a secret"
    assert "auth" not in custom
    assert "secrets" not in worker_app["properties"]["configuration"]


def test_the_platform_identity_is_hidden_from_the_worker_code(worker_app):
    settings = {
        s["identity"]: s["lifecycle"]
        for s in worker_app["properties"]["configuration"]["identitySettings"]
    }
    assert settings == {"workerIdentityId": "Main", "platformIdentityId": "None"}


def test_worker_container_settings_and_probes(bicep, worker_app):
    (container,) = worker_app["properties"]["template"]["containers"]
    env = {entry["name"] for entry in container["env"]}
    assert {
        "LANGGRAPH_KUSTO_QUEUE",
        "LANGGRAPH_KUSTO_CLUSTER",
        "LANGGRAPH_KUSTO_DATABASE",
        "AZURE_CLIENT_ID",
        HEALTH_ENV,
    } <= env

    probe_types = {probe["type"] for probe in container["probes"]}
    assert {"Liveness", "Readiness"} <= probe_types
    probe = variable(bicep["modules/worker.bicep"], container["probes"][0]["httpGet"])
    assert probe["path"] == "/healthz"
    assert probe["port"] == "healthPort"
    assert param_default(bicep["main.bicep"], "workerHealthPort") == dockerfile_health_port()


def test_container_apps_environment_logs_to_log_analytics(bicep):
    document = bicep["modules/worker.bicep"]
    (environment,) = resources_of_type(document, "Microsoft.App/managedEnvironments").values()
    logs = body(environment)["properties"]["appLogsConfiguration"]
    assert logs["destination"] == "log-analytics"
    assert resources_of_type(
        bicep["modules/monitoring.bicep"], "Microsoft.OperationalInsights/workspaces"
    )


# ---------------------------------------------------------------------------------------
# The worker image
# ---------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    instructions = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, rest = stripped.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def dockerfile_health_port() -> int:
    for keyword, rest in final_stage():
        if keyword == "ENV":
            match = re.search(rf"{HEALTH_ENV}=(\d+)", rest)
            if match:
                return int(match.group(1))
    raise AssertionError(f"the image sets no {HEALTH_ENV}")


def test_worker_image_runs_the_worker_as_non_root():
    stage = final_stage()
    users = [rest for keyword, rest in stage if keyword == "USER"]
    assert users, "no USER in the final stage"
    assert users[-1].split(":")[0] not in ("root", "0")
    (entrypoint,) = [rest for keyword, rest in stage if keyword == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["langgraph-kusto", "worker"]
    assert ("EXPOSE", str(dockerfile_health_port())) in stage


def healthcheck_command() -> list[str]:
    (healthcheck,) = [rest for keyword, rest in final_stage() if keyword == "HEALTHCHECK"]
    _, _, command = healthcheck.partition("CMD")
    command = command.strip()
    argv = json.loads(command) if command.startswith("[") else ["sh", "-c", command]
    # The image's `python` is the venv's; here, this interpreter stands in for it.
    return [sys.executable if arg == "python" else arg for arg in argv]


class _Health(BaseHTTPRequestHandler):
    status = 200
    paths: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        type(self).paths.append(self.path)
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[int, type[_Health]]]:
    handler = type("Handler", (_Health,), {"paths": [], "status": 200})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler
    finally:
        server.shutdown()
        server.server_close()


def run_healthcheck(port: int) -> int:
    env = {**os.environ, HEALTH_ENV: str(port)}
    return subprocess.run(
        healthcheck_command(), env=env, capture_output=True, timeout=30
    ).returncode


def test_healthcheck_probes_healthz_on_the_configured_port(health_server):
    port, handler = health_server
    assert run_healthcheck(port) == 0
    assert handler.paths == ["/healthz"]

    handler.status = 503
    assert run_healthcheck(port) != 0, "an unhealthy worker must fail the HEALTHCHECK"


def test_healthcheck_fails_when_nothing_listens(health_server):
    port, _ = health_server
    # A port that was just free: nothing listens there.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    assert free_port != port
    assert run_healthcheck(free_port) != 0


def dockerignore_patterns() -> list[re.Pattern[str]]:
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        assert not line.startswith("!"), "exceptions are not modelled by this test"
        regex = re.escape(line.strip("/")).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        patterns.append(re.compile(regex))
    return patterns


def ignored_by_docker(relative: str) -> bool:
    parts = relative.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(p.fullmatch(prefix) for p in dockerignore_patterns() for prefix in prefixes)


def test_docker_context_keeps_what_the_wheel_build_needs():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = ["pyproject.toml", "provision.kql", project["project"]["readme"]]
    needed += project["tool"]["setuptools"]["package-dir"].values()
    for relative in needed:
        assert not ignored_by_docker(relative), f".dockerignore drops {relative}"
    for relative in ("tests", ".venv", ".git", "saver/__pycache__", "docs"):
        assert ignored_by_docker(relative), f".dockerignore keeps {relative}"


# ---------------------------------------------------------------------------------------
# checkov
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkov_reports() -> dict[str, dict[str, Any]]:
    if not CHECKOV.exists():
        pytest.fail(
            f"checkov is not installed at {CHECKOV.relative_to(ROOT)}: run `bash {SETUP_SCRIPT}`",
            pytrace=False,
        )
    env = {
        **os.environ,
        "BC_SKIP_MAPPING": "TRUE",  # no network look-up of Prisma Cloud guidelines
        "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false",
    }
    command = [
        str(CHECKOV),
        "--directory",
        "infra",
        "--framework",
        "bicep",
        "dockerfile",
        "--skip-download",
        "--output",
        "json",
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.stdout.strip(), f"checkov printed nothing: {shlex.join(command)}\n{done.stderr}"
    reports = json.loads(done.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    by_type = {report["check_type"]: report for report in reports}
    assert set(by_type) == {"bicep", "dockerfile"}, f"checkov scanned {sorted(by_type)}"
    return by_type


@pytest.mark.parametrize("framework", ["bicep", "dockerfile"])
def test_checkov_passes(checkov_reports, framework):
    report = checkov_reports[framework]
    summary, results = report["summary"], report["results"]
    assert summary["parsing_errors"] == 0, f"checkov could not parse {results['parsing_errors']}"
    assert summary["passed"] > 0, "checkov ran no check"
    failures = [
        f"{r['check_id']} {r['check_name']} ({r['file_path']}: {r['resource']})"
        for r in results["failed_checks"]
    ]
    assert not failures, "checkov failed:\n" + "\n".join(failures)
    unjustified = [
        r["check_id"]
        for r in results["skipped_checks"]
        if r.get("check_result", {}).get("suppress_comment", "No comment provided")
        in ("", "No comment provided")
    ]
    assert not unjustified, f"skip these only with `checkov:skip=ID:reason`: {unjustified}"
