// The deploy folder in transformers.js as its users load it (AutoModelForCausalLM + generate, greedy),
// local files only: prints one JSON line per prompt with the generated token ids. No guard here: transformers.js'
// generate() does not read extra graph outputs; guard.mjs is the guarded loop.
//   node transformers.mjs DEPLOY_DIR [--max-new-tokens N] PROMPT ...
import path from "node:path";

import { AutoModelForCausalLM, AutoTokenizer, env } from "@huggingface/transformers";

const argv = process.argv.slice(2);
let maxNewTokens = 32;
const rest = [];
for (let i = 0; i < argv.length; i++) {
  if (argv[i] === "--max-new-tokens") maxNewTokens = Number(argv[++i]);
  else rest.push(argv[i]);
}
const [dir, ...prompts] = rest;
if (!dir || prompts.length === 0) {
  console.error("usage: node transformers.mjs DEPLOY_DIR [--max-new-tokens N] PROMPT ...");
  process.exit(2);
}
env.allowRemoteModels = false;
env.localModelPath = path.dirname(path.resolve(dir));
const id = path.basename(path.resolve(dir));
const tokenizer = await AutoTokenizer.from_pretrained(id, { local_files_only: true });
const model = await AutoModelForCausalLM.from_pretrained(id, { local_files_only: true, dtype: "fp32",
  session_options: { intraOpNumThreads: 2, interOpNumThreads: 1 } });
for (const prompt of prompts) {
  const inputs = tokenizer.apply_chat_template([{ role: "user", content: prompt }],
                                               { add_generation_prompt: true, return_dict: true });
  const output = await model.generate({ ...inputs, max_new_tokens: maxNewTokens, do_sample: false });
  const promptLength = inputs.input_ids.dims.at(-1);
  const tokens = Array.from(output.tolist()[0].slice(promptLength), Number);
  console.log(JSON.stringify({ prompt, tokens, text: tokenizer.decode(tokens, { skip_special_tokens: true }) }));
}
