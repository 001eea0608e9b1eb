"""The report behind `unskill report` (cli/report.py): eval results -> the relative table (after / before) as Markdown, and PNG plots.

Runs are grouped by model (manifest source) and by (method, setting). The original model's run carries KSD
entry alphas for every stats file, so KSD rows come from it at the calibrated alpha (or --alpha): nothing
is re-run. NA and SP rows come from runs of the edited models. Relative = the method's score / the original's
on the same items; abstentions count as failures. Plots (matplotlib, the `report` extra): grouped bars per
setting like Figure 7 of Li et al., and a forget-language x test-language heatmap like their Figure 8.
"""

from __future__ import annotations

import json
from pathlib import Path

from unskill.runtime.errors import UnskillError
from unskill.stats.datasets import XQUAD_LANGUAGES
from unskill.evals.evaluate import ksd_view

METHODS = ("ksd", "na", "sp")
LABELS = {"ksd": "KSD", "na": "NA", "sp": "SP"}
GENERAL = ("mmlu:test", "gen:mmlu")


def setting_tasks(setting: str) -> tuple[list[str], list[str]]:
    """(forget tasks, retain tasks) of a setting: the forgotten skill's tasks and the kept skill's."""
    pairs = {"gsm8k": "mbpp", "mbpp": "gsm8k"}
    if setting in pairs:
        other = pairs[setting]
        return [f"{setting}:test", f"gen:{setting}"], [f"{other}:test", f"gen:{other}"]
    if setting.startswith("xquad-"):
        others = [f"xquad-{lang}" for lang in XQUAD_LANGUAGES if f"xquad-{lang}" != setting]
        return [f"{setting}:test", f"gen:{setting}"], [t for o in others for t in (f"{o}:test", f"gen:{o}")]
    raise UnskillError(f"setting {setting!r}: the report knows gsm8k, mbpp and xquad-LL")


def load_documents(paths: list[str]) -> list[dict]:
    """`unskill eval --out` and calibration JSON files, each with its path under `_path`. A bundle file
    ({"bundle": {NAME: document, ...}}, written by `bundle_documents`) stands for the files it holds, each with
    its NAME as path: a published table keeps one compact file instead of a folder of runs."""
    docs = []
    for path in paths:
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise UnskillError(f"{path}: cannot read results ({exc})") from None
        members = doc["bundle"].items() if isinstance(doc, dict) and isinstance(doc.get("bundle"), dict) \
            else [(path, doc)]
        for name, member in members:
            if not isinstance(member, dict) or "tasks" not in member and "method" not in member:
                raise UnskillError(f"{path}: {'' if name == path else name + ': '}"
                                   f"not an `unskill eval --out` or calibration file")
            member["_path"] = name
            docs.append(member)
    return docs


def bundle_documents(paths: list[str]) -> dict:
    """The bundle of these result files (read back by `load_documents`), keyed by their paths as given."""
    return {"bundle": {path: json.loads(Path(path).read_text(encoding="utf-8")) for path in paths}}


class Model:
    """One model's runs: the original's tasks (with KSD entries) and each edited run's tasks, merged by key."""

    def __init__(self, source: str):
        self.source, self.original, self.edited, self.ksd_stats = source, {}, {}, {}
        self.alphas: dict[str, float] = {}
        self.calibrations: list[dict] = []
        self.edit_ratios: dict[tuple[str, str], float] = {}

    def add(self, doc: dict) -> None:
        method = doc.get("method") or "original"
        if method == "original":
            for task, result in doc["tasks"].items():
                self._add_original(task, result, doc["_path"])
            self.ksd_stats.update((doc.get("ksd") or {}).get("stats", {}))
        else:
            key = ({"prune": "sp"}.get(method, method), doc.get("setting"))
            if key[1] is None:
                raise UnskillError(f"{doc['_path']}: an edited run needs --setting (the forgotten skill)")
            runs = self.edited.setdefault(key, {})
            for task, result in doc["tasks"].items():
                runs.setdefault(task, []).append(result)
            ratios = [edit.get("ratio") for edit in doc.get("edits", []) if edit.get("ratio")]
            if ratios:
                self.edit_ratios[key] = ratios[-1]

    def _add_original(self, task: str, result: dict, path: str) -> None:
        """Two runs of the original on the same task (e.g. MMLU in the GSM8K run and in the XQuAD run) are the
        same items when the sizes match (same seed): merge their KSD entries, so each setting keeps its own."""
        known = self.original.get(task)
        if known is None:
            self.original[task] = result
            return
        if known["items"] != result["items"]:
            raise UnskillError(f"{path}: {task} of the original was run on {result['items']} items here and on "
                               f"{known['items']} in another file; pass runs of one sample size")
        merged = dict(known, entry={**known.get("entry", {}), **result.get("entry", {})})
        self.original[task] = merged

    def settings(self) -> list[str]:
        found = set(self.ksd_stats) | {setting for _, setting in self.edited}
        order = ["gsm8k", "mbpp"] + [f"xquad-{lang}" for lang in XQUAD_LANGUAGES]
        return [s for s in order if s in found]

    def score(self, method: str, setting: str, task: str, alpha: float) -> tuple[float | None, float | None]:
        """(score after, abstain rate) of a method on a task; None where not measured."""
        if method == "ksd":
            base = self.original.get(task)
            if base is None or setting not in base.get("entry", {}):
                return None, None
            view = ksd_view(base, setting, alpha)
            return view["score"], view["abstain"]
        run = self._edited_run(method, setting, task)
        return (run["score"], None) if run else (None, None)

    def _edited_run(self, method: str, setting: str, task: str) -> dict | None:
        """The edited model's run of `task` on as many items as the original's (same seed: the same items);
        a run on another sample size is not comparable and is left out."""
        before = self.original.get(task)
        for run in self.edited.get((method, setting), {}).get(task, []):
            if before is None or run["items"] == before["items"]:
                return run
        return None

    def relative(self, method: str, setting: str, tasks: list[str], alpha: float) -> float | None:
        """Mean over tasks of after / before, skipping tasks not run or with a zero baseline."""
        ratios = []
        for task in tasks:
            before = self.original.get(task, {}).get("score")
            after, _ = self.score(method, setting, task, alpha)
            if after is not None and before:
                ratios.append(after / before)
        return sum(ratios) / len(ratios) if ratios else None


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _by_level(tasks: list[str]) -> tuple[list[str], list[str]]:
    return [t for t in tasks if not t.startswith("gen:")], [t for t in tasks if t.startswith("gen:")]


def relative_table(model: Model) -> list[str]:
    lines = ["| forget | method | forget tok | forget gen | retain tok | retain gen | MMLU tok | MMLU 5-shot "
             "| abstain forget | abstain retain | abstain MMLU |", "|" + "---|" * 11]
    for setting in model.settings():
        forget, retain = setting_tasks(setting)
        for method in METHODS:
            alpha = model.alphas[setting]
            cells = [model.relative(method, setting, part, alpha) for group in (forget, retain, list(GENERAL))
                     for part in (_by_level(group)[0], _by_level(group)[1])]
            if all(c is None for c in cells):
                continue
            abstain = []
            for group in (forget, retain, [GENERAL[0]]):
                rates = [model.score(method, setting, t, alpha)[1] for t in _by_level(group)[0]]
                rates = [r for r in rates if r is not None]
                abstain.append(sum(rates) / len(rates) if rates else None)
            label = LABELS[method] + (f" (α={alpha:.3g}·k)" if method == "ksd" else "")
            if (method, setting) in model.edit_ratios:
                share = model.edit_ratios[(method, setting)]
                label += f" (β={share:.2%})" if method == "na" else f" ({share:.0%} pruned)"
            lines.append(f"| {setting} | {label} | " + " | ".join(_fmt(c) for c in cells) + " | "
                         + " | ".join(_fmt(a) for a in abstain) + " |")
    return lines


def absolute_table(model: Model) -> list[str]:
    tasks = sorted(model.original, key=lambda t: (t.startswith("gen:"), t))
    lines = ["| task | metric | items | original |", "|---|---|---|---|"]
    for task in tasks:
        t = model.original[task]
        lines.append(f"| {task} | {t['metric']} | {t['items']} | {t['score']:.3f} |")
    return lines


def calibration_table(model: Model) -> list[str]:
    lines = ["| forget | method | chosen | retain (validation) | forget (validation) |", "|---|---|---|---|---|"]
    for doc in sorted(model.calibrations, key=lambda d: (d["setting"], d["method"])):
        if doc["method"] == "ksd":
            lines.append(f"| {doc['setting']} | KSD | α = {doc['alpha']:.3g} · k (layer {doc['layer']}) "
                         f"| {doc['retain_abstain']:.1%} of {doc['retain_items']} refused "
                         f"| {doc['forget_abstain']:.1%} of {doc['forget_items']} refused |")
        else:
            chosen = doc.get("chosen")
            tried = ", ".join(f"{c['ratio']:.2%}: {c['retain_rel']:.3f}/{c['forget_rel']:.3f}" for c in doc["candidates"])
            if chosen:
                cells = [f"β = {chosen['ratio']:.2%}", f"top-1 ×{chosen['retain_rel']:.3f}",
                         f"top-1 ×{chosen['forget_rel']:.3f} (tried β: retain/forget {tried})"]
            else:
                cells = ["none met the target", "—", f"tried β: retain/forget {tried}"]
            lines.append(f"| {doc['setting']} | NA | " + " | ".join(cells) + " |")
    for setting, alpha in model.alphas.items():
        if not any(d["setting"] == setting and d["method"] == "ksd" for d in model.calibrations):
            lines.append(f"| {setting} | KSD | α = {alpha:.3g} · k (default, not calibrated) | — | — |")
    return lines


def heatmap_values(model: Model, method: str):
    langs = [lang for lang in XQUAD_LANGUAGES if f"xquad-{lang}" in model.settings()]
    rows = []
    for forget in langs:
        setting = f"xquad-{forget}"
        rows.append([model.relative(method, setting, [f"xquad-{test}:test"], model.alphas[setting])
                     for test in XQUAD_LANGUAGES])
    return langs, rows


def heatmap_methods(model: Model) -> list[str]:
    """The methods with at least one measured cell: a run of KSD alone draws one panel, not two empty ones."""
    return [m for m in METHODS if any(v is not None for row in heatmap_values(model, m)[1] for v in row)]


def plot(model: Model, folder: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    settings = [s for s in model.settings() if not s.startswith("xquad-")]
    xq = [s for s in model.settings() if s.startswith("xquad-")]
    xq_measured = [s for s in xq if any(model.relative(m, s, [f"{s}:test"], model.alphas[s]) is not None
                                        for m in METHODS)]
    groups = settings + (["xquad (mean)"] if xq_measured else [])
    if not groups:
        return []
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False)
    for ax, group in zip(axes[0], groups):
        members = xq if group == "xquad (mean)" else [group]
        bars = {"forget": [], "retain": [], "MMLU": []}
        for method in METHODS:
            values = {"forget": [], "retain": [], "MMLU": []}
            for setting in members:
                forget, retain = setting_tasks(setting)
                alpha = model.alphas[setting]
                for name, tasks in (("forget", forget), ("retain", retain), ("MMLU", list(GENERAL))):
                    v = model.relative(method, setting, _by_level(tasks)[0], alpha)
                    if v is not None:
                        values[name].append(v)
            for name in bars:
                bars[name].append(np.mean(values[name]) if values[name] else np.nan)
        x = np.arange(len(METHODS))
        for offset, (name, heights) in zip((-0.27, 0, 0.27), bars.items()):
            ax.bar(x + offset, heights, 0.27, label=name)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xticks(x, [LABELS[m] for m in METHODS])
        ax.set_ylim(0, 1.15)
        ax.set_title(f"forget {group}")
        ax.set_ylabel("token top-1, after / before")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    fig.suptitle(f"{model.source}: what is forgotten, what is kept")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path = folder / f"{model.source}-bars.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    if xq_measured:
        methods = heatmap_methods(model)
        fig, axes = plt.subplots(1, len(methods), figsize=(4.6 * len(methods) + 1, 4), squeeze=False)
        for ax, method in zip(axes[0], methods):
            langs, rows = heatmap_values(model, method)
            grid = np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=float)
            image = ax.imshow(grid, vmin=0, vmax=1.1, cmap="viridis")
            ax.set_xticks(range(len(XQUAD_LANGUAGES)), XQUAD_LANGUAGES)
            ax.set_yticks(range(len(langs)), langs)
            ax.set_xlabel("test language")
            ax.set_ylabel("forgotten language")
            ax.set_title(LABELS[method])
            for (i, j), v in np.ndenumerate(grid):
                if not np.isnan(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="XQuAD token top-1, after / before")
        fig.suptitle(f"{model.source}: forget one language, test every language")
        path = folder / f"{model.source}-xquad-heatmap.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def results_markdown(results: list[dict], calibration: list[dict], alpha: float, out: Path, folder: Path,
                     commands: list[str]) -> tuple[str, int]:
    """The results report as Markdown (plots written into `folder`, linked relative to `out`) and the number
    of models in it."""
    models: dict[str, Model] = {}
    for doc in results:
        models.setdefault(doc.get("source") or "model", Model(doc.get("source") or "model")).add(doc)
    for doc in calibration:
        model = models.get(doc.get("source"))
        if model is None:
            continue
        setting = doc.get("setting") or doc.get("skill")
        model.calibrations.append(dict(doc, setting=setting))
        if doc["method"] == "ksd":
            model.alphas[setting] = doc["alpha"]
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["# Results: what each method forgets and what it keeps", "",
             "Generated by `unskill report`. Relative figures are after / before on the same items (1.00 = "
             "unchanged); a KSD abstention counts as a failure. `tok` = token-level top-1 of the reference "
             "answer; `gen` = generation metric (GSM8K 8-shot exact match, MBPP pass@1, XQuAD containment); "
             "MMLU 5-shot = letter log-probability accuracy. `—` = not measured, or a zero baseline.", ""]
    for source, model in models.items():
        for setting in model.settings():
            model.alphas.setdefault(setting, alpha)
        lines += [f"## {source}", "", *relative_table(model), "", "Original model, absolute scores:", "",
                  *absolute_table(model), ""]
        lines += ["What calibration chose (validation splits, never the test items above):", "",
                  *calibration_table(model), ""]
        for path in plot(model, folder):
            lines += [f"![{path.stem}]({path.relative_to(out.parent) if path.is_relative_to(out.parent) else path})", ""]
    if commands:
        lines += ["## Commands", ""]
        for path in commands:
            lines += [f"`{path}`:", "", "```", Path(path).read_text(encoding="utf-8").rstrip(), "```", ""]
    return "\n".join(lines), len(models)
