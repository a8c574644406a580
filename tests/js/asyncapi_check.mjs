// Parses and validates an AsyncAPI document with the AsyncAPI initiative's own parser
// (schema and spectral rules); prints {"valid", "diagnostics"} as JSON for
// tests/unit/streaming/test_asyncapi.py.
import { readFileSync } from "node:fs";
import { Parser } from "@asyncapi/parser";

const parser = new Parser();
const { document, diagnostics } = await parser.parse(readFileSync(process.argv[2], "utf8"));
const found = diagnostics.map((d) => ({ severity: d.severity, code: d.code, message: d.message, path: d.path }));
console.log(JSON.stringify({ valid: document !== undefined, diagnostics: found }));
