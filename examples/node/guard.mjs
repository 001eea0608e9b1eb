// A guarded unskill deploy folder in Node with no unskill code: onnxruntime-node runs the graph, its greedy
// decode loop is the one below, and the KSD guard is the graph's own `guard.refuse` output, read every step.
//
//   ONNXRUNTIME_NODE_INSTALL=skip npm ci          (in examples/node; the CPU library ships in the package)
//   node guard.mjs DEPLOY_DIR [--max-new-tokens N] [--json] [PROMPT ...]
//
// DEPLOY_DIR: `unskill export --model smollm2-135m --target deploy --guard math.npz --out DEPLOY_DIR` (math.npz
// made by `unskill guard`; a plain `unskill stats` file needs `--rule paper`: the paper's cube).
// The tokenizer is @huggingface/transformers' AutoTokenizer over DEPLOY_DIR/tokenizer.json (local files only),
// the prompt goes through the folder's chat template, as ksd-run does.
import fs from "node:fs";
import path from "node:path";

import { AutoTokenizer, env } from "@huggingface/transformers";
import ort from "onnxruntime-node";

const ABSTAIN = "Your query is not valid.";
const DEFAULT_PROMPTS = [
  "A baker makes 24 muffins and sells 3/4 of them. How many muffins are left?",
  "Write a python function to reverse a string.",
];

function parseArgs(argv) {
  const args = { dir: null, maxNewTokens: 64, json: false, prompts: [] };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--max-new-tokens") args.maxNewTokens = Number(argv[++i]);
    else if (argv[i] === "--json") args.json = true;
    else if (args.dir === null) args.dir = argv[i];
    else args.prompts.push(argv[i]);
  }
  if (!args.dir || !Number.isInteger(args.maxNewTokens) || args.maxNewTokens < 1) {
    console.error("usage: node guard.mjs DEPLOY_DIR [--max-new-tokens N] [--json] [PROMPT ...]");
    process.exit(2);
  }
  if (args.prompts.length === 0) args.prompts = DEFAULT_PROMPTS;
  return args;
}

function readJson(file) {
  try {
    return JSON.parse(fs.readFileSync(file, "utf8"));
  } catch (error) {
    console.error(`${file}: cannot read it (${error.message.split("\n")[0]})`);
    process.exit(2);
  }
}

async function loadTokenizer(dir) {
  env.allowRemoteModels = false;   // local files only, never the hub
  env.localModelPath = path.dirname(path.resolve(dir));
  return AutoTokenizer.from_pretrained(path.basename(path.resolve(dir)), { local_files_only: true });
}

function emptyPast(session, config, batch) {
  const kvHeads = config.num_key_value_heads ?? config.num_attention_heads;
  const headDim = config.head_dim ?? config.hidden_size / config.num_attention_heads;
  const past = {};
  for (const name of session.inputNames.filter((n) => n.startsWith("past_key_values."))) {
    past[name] = new ort.Tensor("float32", new Float32Array(0), [batch, kvHeads, 0, headDim]);
  }
  return past;
}

function argmaxLast(logits) {
  const vocab = logits.dims.at(-1);
  const data = logits.data;
  const offset = data.length - vocab;   // the last position of the (only) row
  let best = 0;
  for (let v = 1; v < vocab; v++) if (data[offset + v] > data[offset + best]) best = v;
  return best;
}

async function generate(session, tokenizer, config, eos, prompt, maxNewTokens) {
  // The chat template writes its own special tokens; a model without one (Gemma-3's GGUF export) reads the raw
  // prompt with the tokenizer's own BOS, as ksd-run does.
  let ids = tokenizer.chat_template
    ? tokenizer.encode(tokenizer.apply_chat_template([{ role: "user", content: prompt }],
                                                     { add_generation_prompt: true, tokenize: false }),
                       { add_special_tokens: false })
    : tokenizer.encode(prompt);
  ids = ids.map(BigInt);
  const promptLength = ids.length;
  let past = emptyPast(session, config, 1);
  const tokens = [];
  for (let step = 0; step < maxNewTokens; step++) {
    const total = promptLength + tokens.length;
    const feeds = {
      input_ids: new ort.Tensor("int64", BigInt64Array.from(ids), [1, ids.length]),
      attention_mask: new ort.Tensor("int64", new BigInt64Array(total).fill(1n), [1, total]),
      ...past,
    };
    if (session.inputNames.includes("position_ids")) {
      const start = total - ids.length;
      feeds.position_ids = new ort.Tensor("int64", BigInt64Array.from(ids, (_, i) => BigInt(start + i)), [1, ids.length]);
    }
    if (session.inputNames.includes("logits_to_keep")) {
      feeds.logits_to_keep = new ort.Tensor("int64", BigInt64Array.from([1n]), [1]);
    }
    const out = await session.run(feeds);
    // The guard: the graph's decision on this step's last position (the prompt, then every generated token).
    if (out["guard.refuse"].data[0]) {
      return { prompt, refused: true, text: ABSTAIN, tokens: [], refused_at: step };
    }
    const next = argmaxLast(out.logits);
    if (eos.has(next)) break;
    tokens.push(next);
    ids = [BigInt(next)];
    past = {};
    for (const name of Object.keys(out).filter((n) => n.startsWith("present."))) {
      past[name.replace("present.", "past_key_values.")] = out[name];
    }
  }
  return { prompt, refused: false, text: tokenizer.decode(tokens, { skip_special_tokens: true }), tokens };
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const manifest = readJson(path.join(args.dir, "unskill.json"));
  if (!manifest.guard) {
    console.error(`${args.dir}: the graph carries no guard; make it with \`unskill export --target deploy --guard NPZ\``);
    process.exit(2);
  }
  const config = readJson(path.join(args.dir, "config.json"));
  const eos = new Set(readJson(path.join(args.dir, "generation_config.json")).eos_token_id ?? manifest.eos_token_ids);
  const tokenizer = await loadTokenizer(args.dir);
  const session = await ort.InferenceSession.create(path.join(args.dir, manifest.model_file),
                                                    { intraOpNumThreads: 2, interOpNumThreads: 1 });
  for (const prompt of args.prompts) {
    const result = await generate(session, tokenizer, config, eos, prompt, args.maxNewTokens);
    console.log(args.json ? JSON.stringify(result) : `> ${prompt}\n${result.text}\n`);
  }
}

await main();
