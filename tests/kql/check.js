#!/usr/bin/env node
// Checks KQL texts with Microsoft's Kusto.Language (npm @kusto/language-service-next):
// the parser and semantic analyzer Kusto itself uses, compiled to JavaScript.
//
// stdin:  a JSON list of items {name, text, provision?}. Items with "provision": true are
//         the commands of provision.kql, in order. Each is checked against the database
//         as the provision items before it declared it (a first run on an empty database),
//         then what it creates is added: tables (.create/.create-merge/.alter/.alter-merge
//         table[s]), stored functions and materialized views (their columns are the
//         analysed result type of their query). The schema comes from Kusto.Language's own
//         syntax tree of those commands: nothing else declares it. Every other item is
//         checked against the database provision.kql leaves behind.
// stdout: {"database": {...what was declared...}, "results": [{name, kind, command_kind,
//         diagnostics: [{code, severity, message, start, length, line, column, excerpt,
//         source}], notes: [...]}]}
//
// Kusto.Language does not look inside string literals, and accepts a few things silently.
// This script covers those gaps itself (diagnostics with source "check.js", codes LGK*):
//   LGK001 a command its grammar does not know (UnknownCommand): reported, never passed.
//   LGK002 tokens the parser skipped (e.g. text after a complete command) without saying so.
//   LGK010-013 update policy: the JSON is parsed and every "Query" is analysed as a query
//          against the database (Kusto.Language's diagnostics, shifted to the query's
//          position in the policy and prefixed), its "Source" table must exist, and its
//          result columns must match the target table's.
//   LGK020-021 ingestion mappings: the JSON is parsed and every "column" must be a column
//          of the table.
//   LGK030 any other policy given as a string: the JSON must parse (its properties are not
//          validated: recorded in the item's notes).
// Still unchecked (recorded in "notes"): the properties inside policy JSON (batching,
// retention, ...), plain string values of policies (e.g. an encoding type such as
// 'bigobjekt' passes), and the JSON "Properties" (paths) of mapping entries.
'use strict';

global.Bridge = require('@kusto/language-service-next/bridge.min.js');
require('@kusto/language-service-next/Kusto.Language.Bridge.min.js');

const K = Kusto.Language;
const S = K.Symbols;
const Syn = K.Syntax;

const DATABASE = process.env.KQL_CHECK_DATABASE || 'langgraph';

// ---------------------------------------------------------------------------------------
// Declared database
// ---------------------------------------------------------------------------------------

const tables = new Map(); // name -> [[column, type], ...]
const functions = new Map(); // name -> {parameters, body}
const views = new Map(); // name -> {source, query, columns: [[column, type], ...]}
let globals = buildGlobals();

function quoteName(name) {
  return /^[A-Za-z_][A-Za-z0-9_]*$/.test(name) ? name : `['${name.replace(/'/g, "\\'")}']`;
}

function schemaText(columns) {
  return '(' + columns.map(([n, t]) => `${quoteName(n)}:${t}`).join(', ') + ')';
}

function buildGlobals() {
  const members = [];
  for (const [name, columns] of tables) {
    members.push(new S.TableSymbol.$ctor7(name, schemaText(columns), null));
  }
  for (const [name, fn] of functions) {
    members.push(new S.FunctionSymbol.$ctor16(name, fn.parameters, fn.body, null));
  }
  for (const [name, view] of views) {
    members.push(new S.MaterializedViewSymbol.$ctor3(name, schemaText(view.columns), view.query, null));
  }
  return K.GlobalState.Default.WithDatabase(new S.DatabaseSymbol.ctor(DATABASE, members));
}

function describeDatabase() {
  return {
    name: DATABASE,
    tables: Object.fromEntries([...tables].map(([n, c]) => [n, schemaText(c)])),
    functions: Object.fromEntries([...functions].map(([n, f]) => [n, f.parameters])),
    materialized_views: Object.fromEntries([...views].map(([n, v]) => [n, schemaText(v.columns)])),
  };
}

// ---------------------------------------------------------------------------------------
// Syntax helpers
// ---------------------------------------------------------------------------------------

function walk(element, visit) {
  if (!element) return;
  visit(element);
  for (let i = 0; i < element.ChildCount; i++) walk(element.GetChild(i), visit);
}

function find(element, predicate) {
  const found = [];
  walk(element, (e) => { if (predicate(e)) found.push(e); });
  return found;
}

function named(element, name) {
  return find(element, (e) => e.NameInParent === name);
}

function source(text, element) {
  return text.substring(element.TextStart, element.End);
}

function nameOf(text, element) {
  // NameDeclaration / NameReference / bare token: the name's text, brackets removed.
  const raw = source(text, element).trim();
  const m = /^\[\s*(['"])(.*)\1\s*\]$/s.exec(raw);
  return m ? m[2] : raw;
}

function columnsOf(text, element) {
  return named(element, 'ColumnName').map((c) => {
    const type = c.Parent.GetChild(c.IndexInParent + 2);
    return [nameOf(text, c), source(text, type).trim()];
  });
}

function resultColumns(query) {
  const code = K.KustoCode.ParseAndAnalyze(query, globals);
  const type = code.ResultType;
  if (!type || !(type instanceof S.TableSymbol)) return null;
  const columns = [];
  for (let i = 0; i < type.Columns.Count; i++) {
    const c = type.Columns.getItem(i);
    columns.push([c.Name, c.Type.Name]);
  }
  return columns;
}

function commandKind(code) {
  const kinds = [];
  walk(code.Syntax, (e) => {
    if (e instanceof Syn.CustomCommand) kinds.push(e.CommandKind);
    else if (e instanceof Syn.UnknownCommand) kinds.push('UnknownCommand');
    else if (e instanceof Syn.PartialCommand) kinds.push('PartialCommand');
  });
  return kinds.join(', ') || null;
}

// ---------------------------------------------------------------------------------------
// Diagnostics
// ---------------------------------------------------------------------------------------

function position(text, start) {
  const before = text.substring(0, start);
  const line = before.split('\n').length;
  const lineStart = before.lastIndexOf('\n') + 1;
  const lineEnd = text.indexOf('\n', start);
  return { line, column: start - lineStart + 1, excerpt: text.substring(lineStart, lineEnd < 0 ? text.length : lineEnd) };
}

function diagnostic(text, { code, severity, message, start, length, source: from }) {
  return { code, severity, message, start, length, ...position(text, start), source: from };
}

function libraryDiagnostics(text, code, from) {
  const out = [];
  const add = (list, origin) => {
    for (let i = 0; i < list.Count; i++) {
      const d = list.getItem(i);
      out.push(diagnostic(text, {
        code: d.Code, severity: String(d.Severity), message: d.Message,
        start: d.HasLocation ? d.Start : 0, length: d.HasLocation ? d.Length : 0, source: origin,
      }));
    }
  };
  add(code.GetDiagnostics(), from);
  add(new K.Editor.KustoCodeService.ctor(code).GetAnalyzerDiagnostics(true), from + ' analyzers');
  return out;
}

// ---------------------------------------------------------------------------------------
// Checking one text
// ---------------------------------------------------------------------------------------

function jsonLiteral(text, literal, result, code, what) {
  const value = literal.LiteralValue;
  try {
    return JSON.parse(value);
  } catch (err) {
    result.diagnostics.push(diagnostic(text, {
      code, severity: 'Error', message: `${what} is not valid JSON: ${err.message}`,
      start: literal.TextStart, length: literal.Width, source: 'check.js',
    }));
    return undefined;
  }
}

function checkUpdatePolicy(text, codeNode, literal, result) {
  const policy = jsonLiteral(text, literal, result, 'LGK010', 'update policy');
  if (policy === undefined) return;
  const target = nameOf(text, named(codeNode, 'TableName')[0]);
  const entries = Array.isArray(policy) ? policy : [policy];
  const error = (code, message) => result.diagnostics.push(diagnostic(text, {
    code, severity: 'Error', message, start: literal.TextStart, length: literal.Width, source: 'check.js',
  }));
  entries.forEach((entry, i) => {
    if (typeof entry !== 'object' || entry === null || typeof entry.Query !== 'string') {
      error('LGK011', `update policy entry #${i} has no "Query" string`);
      return;
    }
    if (entry.Source !== undefined && !tables.has(entry.Source)) {
      error('LGK011', `update policy entry #${i}: Source table '${entry.Source}' is not declared`);
    }
    const query = entry.Query;
    const code = K.KustoCode.ParseAndAnalyze(query, globals);
    // Positions inside the policy's JSON text are not the query's: report the query's own
    // line/column and point the span at the policy literal.
    for (const d of libraryDiagnostics(query, code, 'Kusto.Language')) {
      result.diagnostics.push({
        ...d,
        message: `update policy entry #${i} query, line ${d.line} column ${d.column} ` +
          `(${JSON.stringify(d.excerpt)}): ${d.message}`,
        ...position(text, literal.TextStart),
        start: literal.TextStart, length: literal.Width,
      });
    }
    const produced = resultColumns(query);
    const expected = tables.get(target);
    if (produced && expected && schemaText(produced) !== schemaText(expected)) {
      error('LGK012', `update policy entry #${i}: the query produces ${schemaText(produced)} ` +
        `but table ${target} is ${schemaText(expected)}`);
    }
    result.notes.push(`update policy entry #${i}: Query extracted from the policy JSON and analysed as a query`);
  });
}

function checkMapping(text, codeNode, literal, result) {
  const mapping = jsonLiteral(text, literal, result, 'LGK020', 'ingestion mapping');
  if (mapping === undefined) return;
  const table = nameOf(text, named(codeNode, 'TableName')[0]);
  const columns = new Set((tables.get(table) || []).map(([n]) => n));
  const entries = Array.isArray(mapping) ? mapping : [];
  for (const entry of entries) {
    const column = entry && (entry.column ?? entry.Column ?? entry.ColumnName);
    if (typeof column === 'string' && tables.has(table) && !columns.has(column)) {
      result.diagnostics.push(diagnostic(text, {
        code: 'LGK021', severity: 'Error',
        message: `ingestion mapping names column '${column}', which table ${table} does not have`,
        start: literal.TextStart, length: literal.Width, source: 'check.js',
      }));
    }
  }
  result.notes.push('ingestion mapping JSON: not analysed by Kusto.Language; check.js parsed it and checked its column names against the table');
}

function checkStringPayloads(text, code, result) {
  for (const command of find(code.Syntax, (e) => e instanceof Syn.CustomCommand)) {
    const kind = command.CommandKind || '';
    for (const literal of find(command, (e) => e instanceof Syn.LiteralExpression && e.Kind === Syn.SyntaxKind.StringLiteralExpression)) {
      const role = literal.NameInParent;
      if (role === 'UpdatePolicy') {
        checkUpdatePolicy(text, command, literal, result);
      } else if (role === 'MappingFormat') {
        checkMapping(text, command, literal, result);
      } else if (/Policy/.test(kind) && /^\s*[[{]/.test(literal.LiteralValue)) {
        if (jsonLiteral(text, literal, result, 'LGK030', `${kind} payload`) !== undefined) {
          result.notes.push(`${kind}: the policy JSON is not analysed by Kusto.Language; check.js only verified that it parses as JSON`);
        }
      } else if (/Policy/.test(kind)) {
        result.notes.push(`${kind}: the value ${JSON.stringify(literal.LiteralValue)} is not validated by Kusto.Language (nor by check.js)`);
      }
    }
  }
}

function checkGuards(text, code, result) {
  walk(code.Syntax, (e) => {
    if (e instanceof Syn.UnknownCommand) {
      result.diagnostics.push(diagnostic(text, {
        code: 'LGK001', severity: 'Error',
        message: 'Kusto.Language does not know this command, so nothing in it was checked',
        start: e.TextStart, length: e.Width, source: 'check.js',
      }));
    } else if (e instanceof Syn.SkippedTokens) {
      const covered = result.diagnostics.some((d) => d.start < e.End && d.start + Math.max(d.length, 1) > e.TextStart);
      if (!covered) {
        result.diagnostics.push(diagnostic(text, {
          code: 'LGK002', severity: 'Error',
          message: `the parser skipped ${JSON.stringify(source(text, e))} without a diagnostic`,
          start: e.TextStart, length: e.Width, source: 'check.js',
        }));
      }
    }
  });
}

function check(item) {
  const text = item.text;
  const code = K.KustoCode.ParseAndAnalyze(text, globals);
  const result = {
    name: item.name, kind: code.Kind, command_kind: commandKind(code), diagnostics: [], notes: [],
  };
  result.diagnostics.push(...libraryDiagnostics(text, code, 'Kusto.Language'));
  checkGuards(text, code, result);
  checkStringPayloads(text, code, result);
  return { code, result };
}

// ---------------------------------------------------------------------------------------
// Declaring what a provision command creates
// ---------------------------------------------------------------------------------------

function declare(text, code) {
  for (const command of find(code.Syntax, (e) => e instanceof Syn.CustomCommand)) {
    const kind = command.CommandKind;
    if (/^(Create|CreateMerge|Alter|AlterMerge)Tables?$/.test(kind)) {
      for (const nameNode of named(command, 'TableName')) {
        const name = nameOf(text, nameNode);
        const declared = columnsOf(text, nameNode.Parent);
        const merge = /Merge/.test(kind) || (kind.startsWith('Create') && tables.has(name));
        const columns = merge ? [...(tables.get(name) || [])] : [];
        for (const [column, type] of declared) {
          if (!columns.some(([c]) => c === column)) columns.push([column, type]);
        }
        tables.set(name, columns);
      }
    } else if (/^(Create|Alter|CreateOrAlter)Function$/.test(kind)) {
      const name = nameOf(text, named(command, 'FunctionName')[0]);
      const declaration = find(command, (e) => e instanceof Syn.FunctionDeclaration)[0];
      functions.set(name, {
        parameters: source(text, declaration.Parameters),
        body: source(text, declaration.Body),
      });
    } else if (/MaterializedView$/.test(kind) && /^(Create|Alter|CreateOrAlter)/.test(kind)) {
      const name = nameOf(text, named(command, 'MaterializedViewName')[0]);
      const body = named(command, 'SourceBody')[0];
      const query = text.substring(body.OpenBrace.End, body.CloseBrace.TextStart).trim();
      views.set(name, { query, columns: resultColumns(query) || [] });
    } else if (/^DropTables?$/.test(kind)) {
      for (const n of named(command, 'TableName')) tables.delete(nameOf(text, n));
    } else if (kind === 'DropFunction') {
      for (const n of named(command, 'FunctionName')) functions.delete(nameOf(text, n));
    } else if (kind === 'DropMaterializedView') {
      for (const n of named(command, 'MaterializedViewName')) views.delete(nameOf(text, n));
    } else {
      continue;
    }
    globals = buildGlobals();
  }
}

// ---------------------------------------------------------------------------------------

function main(input) {
  const items = JSON.parse(input);
  if (!Array.isArray(items)) throw new Error('stdin must be a JSON list of {name, text, provision?}');
  const results = new Array(items.length);
  items.forEach((item, i) => {
    if (!item.provision) return;
    const { code, result } = check(item);
    declare(item.text, code);
    results[i] = result;
  });
  // Many renderings share a text (parameters never enter it): analyse each text once.
  const byText = new Map();
  items.forEach((item, i) => {
    if (item.provision) return;
    if (!byText.has(item.text)) byText.set(item.text, check(item).result);
    results[i] = { ...byText.get(item.text), name: item.name };
  });
  process.stdout.write(JSON.stringify({ database: describeDatabase(), results }));
}

let input = '';
process.stdin.setEncoding('utf8');
process.stdin.on('data', (chunk) => { input += chunk; });
process.stdin.on('end', () => main(input));
