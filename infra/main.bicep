// langgraph-checkpoint-kusto on Azure: the outbox queue (Service Bus), the checkpoint store
// (Azure Data Explorer, schema from provision.kql) and the ingestor worker (Container Apps,
// scaled by KEDA on queue length). Every identity gets the least it needs; no keys or
// connection strings are issued (Service Bus local auth is disabled).
//
// Deploy into a resource group:
//   az deployment group create -g <rg> -f infra/main.bicep -p namePrefix=<prefix> workerImage=<image>
// docs/deploy-azure.md explains every parameter and role.

targetScope = 'resourceGroup'

// ---------------------------------------------------------------------------------------
// Names and location
// ---------------------------------------------------------------------------------------

@description('Short lowercase prefix for every resource name (letters and digits, starts with a letter).')
@minLength(2)
@maxLength(8)
param namePrefix string

@description('Azure region of every resource; defaults to the resource group\'s.')
param location string = resourceGroup().location

@description('Tags applied to every resource.')
param tags object = {}

@description('Suffix that makes the globally unique names unique; stable for a resource group and prefix.')
@maxLength(13)
param nameSuffix string = take(uniqueString(resourceGroup().id, namePrefix), 6)

@description('Service Bus namespace name (globally unique, 6-50 characters).')
@minLength(6)
@maxLength(50)
param serviceBusNamespaceName string = 'sb-${namePrefix}-${nameSuffix}'

@description('Name of the outbox queue the saver publishes to and the worker receives from.')
param queueName string = 'langgraph-checkpoints'

@description('Azure Data Explorer cluster name (globally unique, 4-22 lowercase letters and digits).')
@minLength(4)
@maxLength(22)
param kustoClusterName string = toLower(take('adx${namePrefix}${nameSuffix}', 22))

@description('Kusto database holding the CheckpointEvents table.')
param kustoDatabaseName string = 'langgraph'

@description('Log Analytics workspace name (Container Apps logs, Service Bus and Kusto diagnostics).')
param logAnalyticsWorkspaceName string = 'log-${namePrefix}-${nameSuffix}'

@description('Container Apps environment name.')
param containerAppsEnvironmentName string = 'cae-${namePrefix}-${nameSuffix}'

@description('Container app name of the ingestor worker.')
@maxLength(32)
param workerAppName string = 'ca-${namePrefix}-worker'

// ---------------------------------------------------------------------------------------
// Service Bus
// ---------------------------------------------------------------------------------------

@description('Service Bus tier. Sessions and duplicate detection need Standard or Premium; Premium allows messages up to 100 MB and private networking.')
@allowed([
  'Standard'
  'Premium'
])
param serviceBusSku string = 'Standard'

@description('Premium messaging units (ignored for Standard).')
@allowed([
  1
  2
  4
  8
  16
])
param serviceBusPremiumCapacity int = 1

@description('Window in which Service Bus drops a message whose message_id it has seen (ISO 8601, 20 seconds to 7 days).')
param duplicateDetectionWindow string = 'PT10M'

@description('Deliveries before a message moves to the dead-letter queue with reason MaxDeliveryCountExceeded.')
@minValue(1)
@maxValue(2000)
param maxDeliveryCount int = 10

@description('Peek-lock duration (ISO 8601, at most PT5M); the worker renews locks while it ingests.')
param lockDuration string = 'PT1M'

@description('Time to live of a message; an expired message is dead-lettered, not dropped.')
param messageTimeToLive string = 'P14D'

// ---------------------------------------------------------------------------------------
// Azure Data Explorer
// ---------------------------------------------------------------------------------------

@description('Kusto cluster SKU. "Dev(No SLA)_..." SKUs are single-node and cheap; use a Standard_* SKU with capacity >= 2 in production.')
param kustoSkuName string = 'Dev(No SLA)_Standard_E2a_v4'

@description('Kusto cluster instance count (1 for Dev SKUs, 2 or more otherwise).')
@minValue(1)
@maxValue(1000)
param kustoCapacity int = 1

@description('How long checkpoint rows are kept (database soft-delete period, ISO 8601).')
param kustoRetention string = 'P365D'

@description('How long checkpoint rows stay in the hot cache (fast reads), ISO 8601.')
param kustoHotCache string = 'P31D'

@description('Allow .purge (needed to erase one user\'s data for GDPR requests).')
param kustoEnablePurge bool = true

@description('Principals that may query checkpoints (Kusto database Viewer): [{ principalId, principalType }] where principalType is App (application/client id), Group (group object id) or User (UPN or object id).')
param kustoViewers array = []

// ---------------------------------------------------------------------------------------
// Worker
// ---------------------------------------------------------------------------------------

@description('Worker container image, built from infra/worker.Dockerfile (e.g. myregistry.azurecr.io/langgraph-kusto-worker:0.1.0).')
param workerImage string

@description('Azure Container Registry login server the image is pulled from, e.g. myregistry.azurecr.io; empty for a public image.')
param containerRegistryServer string = ''

@description('Name of that registry if it lives in this resource group: the pull identity then gets AcrPull on it. Leave empty and grant AcrPull yourself otherwise.')
param containerRegistryName string = ''

@description('Minimum worker replicas; 0 lets KEDA scale to zero when the queue is empty (the first event then waits for a cold start).')
@minValue(0)
@maxValue(300)
param workerMinReplicas int = 1

@description('Maximum worker replicas. With sessions, more replicas than concurrently active threads do not add throughput.')
@minValue(1)
@maxValue(300)
param workerMaxReplicas int = 10

@description('Active messages per replica KEDA aims for: replicas = ceil(active messages / this).')
@minValue(1)
param workerMessagesPerReplica int = 500

@description('vCPU per worker replica (0.25 - 4, paired with memory as Container Apps requires).')
param workerCpu string = '0.5'

@description('Memory per worker replica, e.g. 1Gi (2 GiB per vCPU at most on the Consumption profile).')
param workerMemory string = '1Gi'

@description('Port of the worker health endpoint (GET /healthz).')
param workerHealthPort int = 8080

@description('Log Analytics retention in days.')
@minValue(30)
@maxValue(730)
param logRetentionDays int = 30

@description('Operators who run `langgraph-kusto dlq` (list / replay / purge dead letters): [{ principalId, principalType }] with an Entra object id and principalType User, Group or ServicePrincipal. They get Service Bus Data Receiver and Sender on the queue.')
param queueOperators array = []

// ---------------------------------------------------------------------------------------
// Identities: one per role, so each can be granted exactly what it needs.
// ---------------------------------------------------------------------------------------

// Agent apps attach this identity: it publishes events and reads checkpoints.
resource appIdentity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: 'id-${namePrefix}-app'
  location: location
  tags: tags
}

// The worker process runs as this identity: it receives events and ingests them.
resource workerIdentity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: 'id-${namePrefix}-worker'
  location: location
  tags: tags
}

// Used only by the Container Apps platform (KEDA scaler, image pull), never by the worker's
// code: the KEDA Service Bus scaler reads queue runtime properties, which needs Manage rights.
resource platformIdentity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: 'id-${namePrefix}-worker-platform'
  location: location
  tags: tags
}

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  params: {
    location: location
    tags: tags
    workspaceName: logAnalyticsWorkspaceName
    retentionInDays: logRetentionDays
  }
}

module serviceBus 'modules/servicebus.bicep' = {
  name: 'servicebus'
  params: {
    location: location
    tags: tags
    namespaceName: serviceBusNamespaceName
    sku: serviceBusSku
    premiumCapacity: serviceBusPremiumCapacity
    queueName: queueName
    duplicateDetectionWindow: duplicateDetectionWindow
    maxDeliveryCount: maxDeliveryCount
    lockDuration: lockDuration
    messageTimeToLive: messageTimeToLive
    senderPrincipalIds: [
      appIdentity.properties.principalId
    ]
    receiverPrincipalIds: [
      workerIdentity.properties.principalId
    ]
    scalerPrincipalIds: [
      platformIdentity.properties.principalId
    ]
    operators: queueOperators
    logAnalyticsWorkspaceId: monitoring.outputs.workspaceId
  }
}

module kusto 'modules/kusto.bicep' = {
  name: 'kusto'
  params: {
    location: location
    tags: tags
    clusterName: kustoClusterName
    databaseName: kustoDatabaseName
    skuName: kustoSkuName
    capacity: kustoCapacity
    retention: kustoRetention
    hotCache: kustoHotCache
    enablePurge: kustoEnablePurge
    ingestorClientIds: [
      workerIdentity.properties.clientId
    ]
    viewerClientIds: [
      appIdentity.properties.clientId
    ]
    viewers: kustoViewers
    logAnalyticsWorkspaceId: monitoring.outputs.workspaceId
  }
}

module worker 'modules/worker.bicep' = {
  name: 'worker'
  params: {
    location: location
    tags: tags
    environmentName: containerAppsEnvironmentName
    appName: workerAppName
    logAnalyticsWorkspaceName: monitoring.outputs.workspaceName
    image: workerImage
    registryServer: containerRegistryServer
    registryName: containerRegistryName
    workerIdentityId: workerIdentity.id
    workerIdentityClientId: workerIdentity.properties.clientId
    platformIdentityId: platformIdentity.id
    platformIdentityPrincipalId: platformIdentity.properties.principalId
    serviceBusNamespaceName: serviceBus.outputs.namespaceName
    queueName: serviceBus.outputs.queueName
    queueUrl: serviceBus.outputs.queueUrl
    kustoClusterUri: kusto.outputs.clusterUri
    kustoDatabaseName: kusto.outputs.databaseName
    minReplicas: workerMinReplicas
    maxReplicas: workerMaxReplicas
    messagesPerReplica: workerMessagesPerReplica
    cpu: workerCpu
    memory: workerMemory
    healthPort: workerHealthPort
  }
}

// ---------------------------------------------------------------------------------------
// What apps and operators need to connect (all of it is safe to print: no secrets).
// ---------------------------------------------------------------------------------------

@description('LANGGRAPH_KUSTO_QUEUE for apps and the worker: sb://<namespace>.servicebus.windows.net/<queue>.')
output queueUrl string = serviceBus.outputs.queueUrl

@description('LANGGRAPH_KUSTO_CLUSTER: the Kusto cluster (query) URI.')
output clusterUri string = kusto.outputs.clusterUri

@description('Kusto ingestion (data management) URI, for queued ingestion.')
output ingestionUri string = kusto.outputs.ingestionUri

@description('LANGGRAPH_KUSTO_DATABASE.')
output databaseName string = kusto.outputs.databaseName

@description('Resource id of the identity agent apps attach (Service Bus Data Sender + Kusto Viewer).')
output appIdentityResourceId string = appIdentity.id

@description('AZURE_CLIENT_ID for agent apps using the app identity.')
output appIdentityClientId string = appIdentity.properties.clientId

@description('Client id of the worker identity (Service Bus Data Receiver + Kusto Ingestor).')
output workerIdentityClientId string = workerIdentity.properties.clientId

@description('Name of the worker container app.')
output workerAppName string = worker.outputs.appName
