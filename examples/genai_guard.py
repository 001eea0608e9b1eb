"""A KSD-guarded decode loop on onnxruntime-genai: genai runs the model, the guard is the graph's or unskill's NumPy one.

    python examples/genai_guard.py out/smollm2 --stats out/gsm8k.npz "Tom has 3 apples..." [--alpha 1.5]
    python examples/genai_guard.py out/smollm2-deploy "Tom has 3 apples..."   # a folder made with --guard NPZ

Without --stats the folder must carry its guard (`unskill edit guard`, `--guard` on export): the loop then reads
the graph's `guard.refuse` output (Generator.get_output), the same call a C, C# or Java genai app makes.

genai loads the folder as written by `unskill export` / `unskill edit` (genai_config.json, tokenizer.json,
tokenizer_config.json with the chat template). After every forward call (the prompt, then each new token)
the loop reads `key_last.{layer}` with Generator.get_output and asks unskill.runtime.ksd.KSDGuard whether
it lies in a forgotten skill's hypercube; a hit replaces the whole answer by the abstain message, exactly
as `ksd-run` does (same tokens, same step). The guard is NumPy only: the same check ports to C#, Java or
JavaScript genai apps (README, "Guarding other stacks").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime_genai as og

from unskill.runtime.ksd import Hit, KSDGuard
from unskill.runtime.manifest import load_manifest
from unskill.runtime.statsfile import load_stats

ABSTAIN_MESSAGE = "Your query is not valid."


def full_width(key: np.ndarray, kept: list[int] | None, width: int) -> np.ndarray:
    """A pruned layer's key with zeros where removed neurons were: stats keep the original width."""
    if kept is None or len(kept) == width:
        return key
    full = np.zeros(key.shape[:-1] + (width,), dtype=key.dtype)
    full[..., kept] = key
    return full


def guarded_generate(model_dir: str | Path, stats: list[str], prompt: str, max_new_tokens: int = 256,
                     alpha: float = 1.0, layers: list[int] | None = None, chat: bool = True) -> dict:
    manifest = load_manifest(model_dir)
    if not stats and not manifest.guard:
        raise SystemExit(f"{model_dir}: the graph carries no guard; give --stats or make it with --guard NPZ")
    guard = KSDGuard([load_stats(path, manifest) for path in stats], manifest, alpha=alpha, layers=layers) \
        if stats else None
    model = og.Model(str(model_dir))
    tokenizer = og.Tokenizer(model)
    if chat and manifest.chat_template:   # the template writes its own special tokens
        text = tokenizer.apply_chat_template(json.dumps([{"role": "user", "content": prompt}]),
                                             add_generation_prompt=True)
    else:   # a raw prompt gets BOS where the model wants one (genai adds no special tokens by default)
        text = prompt
        tokenizer.update_options(add_special_tokens="true")
    ids = tokenizer.encode(text)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + max_new_tokens)
    generator = og.Generator(model, params)
    kept = manifest.kept_neurons or [None] * manifest.num_layers

    def hit_now(prompt: bool = False):
        if guard is None:   # the graph's own decision, bool [batch]
            if not generator.get_output(manifest.guard["refuse_output"])[0]:
                return None
            skill = next(s for s in manifest.guard["skills"] if generator.get_output(s["refuse_output"])[0])
            return Hit(skill["skill"], None, skill["rule"])
        # at the prompt a rule over its last tokens reads their keys (key.*, [1, S, F]); every position is the row's
        names = guard.prompt_output_names if prompt else guard.output_names
        keys = {name: full_width(generator.get_output(name), kept[int(name.split(".")[-1])], manifest.key_width)
                for name in names}
        return guard.check(keys)[0]

    generator.append_tokens(ids)          # the prompt's forward call
    hit, step = hit_now(prompt=True), 0
    while hit is None and not generator.is_done():
        generator.generate_next_token()   # picks a token from the last forward's logits
        step += 1
        if generator.is_done():           # EOS or max_new_tokens: no forward after the last token
            break
        generator.get_logits()            # runs that token's forward now, so its key is checked first
        hit = hit_now()
    if hit is not None:
        return {"text": ABSTAIN_MESSAGE, "token_ids": [], "abstained": True, "skill": hit.skill, "layer": hit.layer,
                "abstained_at": step}
    new = [int(t) for t in generator.get_sequence(0)[len(ids):] if int(t) not in manifest.eos_token_ids]
    return {"text": tokenizer.decode(new), "token_ids": new, "abstained": False, "skill": None, "layer": None,
            "abstained_at": None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="folder written by `unskill export` / `unskill edit` (deploy folders too)")
    parser.add_argument("prompt")
    parser.add_argument("--stats", action="append", default=[],
                        help="stats .npz of a skill to refuse (none: the guard in the graph)")
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--layers", type=int, nargs="*", default=None, help="FFL layers to check (default: last)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--no-chat", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the result record instead of the text")
    args = parser.parse_args(argv)
    result = guarded_generate(args.model, args.stats, args.prompt, args.max_new_tokens, args.alpha, args.layers,
                              chat=not args.no_chat)
    print(json.dumps(result) if args.json else result["text"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
