// Compiles the contracts with the pinned solc-js into committed JSON artifacts.
//
//   node contracts/build.mjs [outDir]      (outDir defaults to contracts/artifacts)
//
// src/*.sol      -> <outDir>/<Contract>.json
// test_src/*.sol -> <outDir>/test/<Contract>.json   (test-only contracts, e.g. a hostile token)
//
// The output depends only on the sources and this script, never on the working directory, the clock or the
// machine: sources get stable unit names ("src/X.sol", "@openzeppelin/contracts/..."), are listed in sorted
// order in a self-contained standard-JSON input, and every JSON file is written with a fixed key order.
import { createHash } from "node:crypto";
import fs from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";
import { fileURLToPath } from "node:url";

const SOLC_VERSION = "0.8.37";
const EVM_VERSION = "prague";
const OPTIMIZER_RUNS = 200;
const OZ_PREFIX = "@openzeppelin/contracts/";

const contractsDir = path.dirname(fileURLToPath(import.meta.url));
const solc = createRequire(import.meta.url)("solc");

function fail(message) {
  process.stderr.write(`build.mjs: ${message}\n`);
  process.exit(1);
}

function sha256(text) {
  return createHash("sha256").update(text, "utf8").digest("hex");
}

// Objects with their keys sorted at every level, so that serialisation never depends on insertion order.
function canonical(value) {
  if (Array.isArray(value)) return value.map(canonical);
  if (value !== null && typeof value === "object") {
    return Object.fromEntries(
      Object.keys(value)
        .sort()
        .map((key) => [key, canonical(value[key])]),
    );
  }
  return value;
}

// Maps a source unit name to the file it names; only our folders and OpenZeppelin are reachable.
function unitPath(unit) {
  if (path.posix.normalize(unit) !== unit || unit.split("/").includes("..")) return null;
  if (unit.startsWith(OZ_PREFIX)) return path.join(contractsDir, "node_modules", unit);
  if (unit.startsWith("src/") || unit.startsWith("test_src/")) return path.join(contractsDir, unit);
  return null;
}

function readUnit(unit) {
  const file = unitPath(unit);
  if (file === null || !fs.existsSync(file)) return null;
  return fs.readFileSync(file, "utf8");
}

function settings(extra) {
  return {
    evmVersion: EVM_VERSION,
    metadata: { bytecodeHash: "none" },
    optimizer: { enabled: true, runs: OPTIMIZER_RUNS },
    ...extra,
  };
}

function compile(input, findImports) {
  const output = JSON.parse(solc.compile(JSON.stringify(input), { import: findImports }));
  const problems = (output.errors ?? []).filter((e) => e.severity === "error" || e.severity === "warning");
  if (problems.length > 0) {
    fail(`compilation reported problems:\n${problems.map((e) => e.formattedMessage ?? e.message).join("\n")}`);
  }
  return output;
}

// Standard-JSON input holding every source the root files need, sorted by name. A first pass that stops at
// the AST (no code generation) lets solc resolve the imports through the callback.
function selfContainedInput(rootUnits) {
  const roots = Object.fromEntries(rootUnits.map((unit) => [unit, { content: readUnit(unit) }]));
  const parsed = compile(
    { language: "Solidity", sources: roots, settings: settings({ outputSelection: { "*": { "": ["ast"] } } }) },
    (unit) => {
      const content = readUnit(unit);
      return content === null ? { error: `import not allowed or not found: ${unit}` } : { contents: content };
    },
  );
  const units = Object.keys(parsed.sources ?? {}).sort();
  const sources = Object.fromEntries(units.map((unit) => [unit, { content: readUnit(unit) }]));
  return {
    language: "Solidity",
    sources,
    settings: settings({
      outputSelection: {
        "*": { "*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object", "metadata"] },
      },
    }),
  };
}

function artifactsOf(rootUnits) {
  const input = selfContainedInput(rootUnits);
  const inputText = JSON.stringify(input);
  const output = compile(input, (unit) => ({ error: `unexpected import ${unit}` }));
  const artifacts = [];
  for (const unit of rootUnits) {
    for (const [name, contract] of Object.entries(output.contracts?.[unit] ?? {}).sort()) {
      const bytecode = contract.evm.bytecode.object;
      if (bytecode.length === 0) continue; // interfaces and abstract contracts
      if (bytecode.includes("__$")) fail(`${name} needs library linking, which the artifacts do not support`);
      const used = Object.keys(JSON.parse(contract.metadata).sources).sort();
      const sources = Object.fromEntries(used.map((u) => [u, sha256(input.sources[u].content)]));
      const sourceHash = sha256(used.map((u) => `${sources[u]}  ${u}\n`).join(""));
      artifacts.push({
        contractName: name,
        sourceName: unit,
        compiler: {
          name: "solc-js",
          version: solc.version(),
          evmVersion: EVM_VERSION,
          optimizer: { enabled: true, runs: OPTIMIZER_RUNS },
          metadataBytecodeHash: "none",
        },
        abi: canonical(contract.abi),
        bytecode: `0x${bytecode}`,
        deployedBytecode: `0x${contract.evm.deployedBytecode.object}`,
        sourceHash,
        sources,
        inputHash: sha256(inputText),
      });
    }
  }
  return artifacts;
}

function solFiles(folder) {
  const dir = path.join(contractsDir, folder);
  if (!fs.existsSync(dir)) return [];
  return fs
    .readdirSync(dir)
    .filter((f) => f.endsWith(".sol"))
    .sort()
    .map((f) => `${folder}/${f}`);
}

// Writes the artifacts into `dir` and removes artifacts there that the sources no longer produce.
function writeArtifacts(dir, artifacts) {
  fs.mkdirSync(dir, { recursive: true });
  const names = new Set(artifacts.map((a) => `${a.contractName}.json`));
  if (names.size !== artifacts.length) fail(`two contracts share a name in ${dir}`);
  for (const file of fs.readdirSync(dir)) {
    if (file.endsWith(".json") && !names.has(file)) fs.rmSync(path.join(dir, file));
  }
  for (const artifact of artifacts) {
    fs.writeFileSync(path.join(dir, `${artifact.contractName}.json`), `${JSON.stringify(artifact, null, 2)}\n`);
  }
}

function main() {
  if (!solc.version().startsWith(`${SOLC_VERSION}+`)) {
    fail(`solc ${solc.version()} found, ${SOLC_VERSION} pinned; run npm ci in contracts/`);
  }
  const outDir = path.resolve(process.argv[2] ?? path.join(contractsDir, "artifacts"));
  const production = artifactsOf(solFiles("src"));
  const testOnly = artifactsOf(solFiles("test_src"));
  writeArtifacts(outDir, production);
  writeArtifacts(path.join(outDir, "test"), testOnly);
  for (const a of [...production, ...testOnly]) {
    const size = (a.deployedBytecode.length - 2) / 2;
    process.stdout.write(`${a.sourceName}:${a.contractName}  ${size} bytes deployed\n`);
  }
}

main();
