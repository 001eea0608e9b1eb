"""--ray on a local Ray cluster of 2 CPUs (one per test module, Ray starts in ~10-20 s): stats, calibration, the
one-command guard and eval give what the single-process commands give, a killed actor's batch is retried and
counted once, a worker with another model is refused, and two Ray Serve replicas answer concurrent requests as
ksd-run does."""

import json
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from unskill.cli import main
from unskill.runtime.errors import UnskillError
from unskill.runtime.statsfile import load_stats

APPLES = [f"How many apples are left if Tom eats {i} of his {i + 9} apples?" for i in range(40)]
CODE = [f"Write a python function number {i} that adds {i} to a list" for i in range(24)]
RAY = ["--ray", "--actors", "2", "--no-progress"]


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray", reason="the `ray` extra is not installed (pip install 'unskill[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    from ray import serve
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(tiny_export):
    return tiny_export("llama")[1]


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    """JSONL with completions (the text pass reads prompt + completion) and plain prompt lists."""
    root = tmp_path_factory.mktemp("ray_data")
    (root / "forget.jsonl").write_text("".join(json.dumps({"prompt": p, "completion": f" {i + 9} - {i} = 9"}) + "\n"
                                               for i, p in enumerate(APPLES)))
    (root / "retain.jsonl").write_text("".join(json.dumps({"prompt": p, "completion": " def f(xs): return xs"}) + "\n"
                                               for p in CODE))
    (root / "forget_val.txt").write_text("\n".join(f"Tom eats {i} of his {i + 20} apples: how many are left?"
                                                   for i in range(12)) + "\n")
    (root / "retain_val.txt").write_text("\n".join(f"Write a python function called f{i}" for i in range(16)) + "\n")
    return root


@pytest.fixture(scope="module")
def single_stats(model_dir, prompt_files, tmp_path_factory):
    """The single-process file: batch 4, so each pass plans 10+ batches (two Ray tasks of 32 rows each)."""
    out = tmp_path_factory.mktemp("single") / "stats.npz"
    assert main(["stats", "--model", str(model_dir), "--forget", str(prompt_files / "forget.jsonl"), "--retain",
                 str(prompt_files / "retain.jsonl"), "--batch-size", "4", "--augment", "none", "--no-progress",
                 "--out", str(out)]) == 0
    return out


def assert_same_stats(single_path, ray_path):
    """Counts, minima and maxima equal; sums equal up to float64 summation order (1e-12 of their magnitude)."""
    single, distributed = load_stats(single_path), load_stats(ray_path)
    assert sorted(single.groups) == sorted(distributed.groups)
    assert single.fingerprint == distributed.fingerprint and single.meta == distributed.meta
    for name, moments in single.groups.items():
        other = distributed.groups[name]
        np.testing.assert_array_equal(moments.count, other.count)
        for field in moments.fields:
            a, b = moments.values[field], other.values[field]
            if field in ("min", "max", "pos_count"):
                np.testing.assert_array_equal(a, b, err_msg=f"{name}.{field}")
            else:
                np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12 * np.abs(a).max(), err_msg=f"{name}.{field}")


def ray_stats(model_dir, prompt_files, out):
    return main(["stats", "--model", str(model_dir), "--forget", str(prompt_files / "forget.jsonl"), "--retain",
                 str(prompt_files / "retain.jsonl"), "--batch-size", "4", "--augment", "none", *RAY, "--out", str(out)])


def test_stats_on_ray_equal_the_single_process_file(cluster, model_dir, prompt_files, single_stats, tmp_path):
    assert ray_stats(model_dir, prompt_files, tmp_path / "ray.npz") == 0
    assert_same_stats(single_stats, tmp_path / "ray.npz")


def test_a_killed_actor_is_retried_and_counted_once(cluster, model_dir, prompt_files, single_stats, tmp_path,
                                                    monkeypatch):
    from unskill.cluster.pool import CRASH_ENV

    marker = tmp_path / "crashed"
    monkeypatch.setenv(CRASH_ENV, str(marker))   # the first actor call kills its own process
    assert ray_stats(model_dir, prompt_files, tmp_path / "ray.npz") == 0
    assert marker.exists()
    assert_same_stats(single_stats, tmp_path / "ray.npz")


def test_a_worker_with_another_model_is_refused_in_one_line(cluster, model_dir):
    from unskill.cluster.jobs import KeyWork
    from unskill.cluster.pool import RayOptions, map_items

    with pytest.raises(UnskillError, match=r"^worker on .*holds another model \(fingerprint") as caught:
        map_items([1, 2], KeyWork(str(model_dir)), RayOptions(actors=1, progress=False), model_dir=model_dir,
                  fingerprint="sha256:not-this-model", desc="refused")
    assert "\n" not in str(caught.value)


def test_a_serve_replica_with_another_model_is_refused(model_dir):
    """The check each Ray Serve replica runs before loading (constructed here in-process, no Serve needed)."""
    pytest.importorskip("ray", reason="the `ray` extra is not installed (pip install 'unskill[ray]')")
    from unskill.cli import build_parser
    from unskill.cluster.serve import GuardedReplica
    from unskill.serve import build_server

    args = build_parser().parse_args(["serve", "--model", str(model_dir), "--ray"])
    with pytest.raises(UnskillError, match=r"^replica on .*holds another model"):
        GuardedReplica(args, "sha256:not-this-model", build_server)


def test_calibration_on_ray_stores_the_same_rule(cluster, model_dir, prompt_files, single_stats, tmp_path):
    rules = {}
    for mode, extra in (("single", ["--no-progress"]), ("ray", RAY)):
        stats = str(shutil.copy(single_stats, tmp_path / f"{mode}.npz"))
        assert main(["calibrate", "--model", str(model_dir), "--stats", stats, "--retain",
                     str(prompt_files / "retain_val.txt"), "--forget", str(prompt_files / "forget_val.txt"),
                     "--target", "0.1", "--no-mmlu-retain", "--decode-check", "2", "--decode-prompts", "4",
                     *extra]) == 0
        rules[mode] = load_stats(stats)
    assert rules["ray"].guard is not None and rules["ray"].guard.to_json() == rules["single"].guard.to_json()
    assert sorted(rules["ray"].groups) == sorted(rules["single"].groups)
    if "ksd_retain" in rules["single"].groups:
        assert_same_groups = rules["single"].groups["ksd_retain"], rules["ray"].groups["ksd_retain"]
        np.testing.assert_array_equal(*(g.values["sum"] for g in assert_same_groups))


def test_guard_on_ray_stores_the_same_rule(cluster, model_dir, tmp_path):
    """`unskill guard --ray`: the probes' keys and their last tokens' mean, the calibration's prompt passes and
    the last positions' pass run on the pool, the same keys as in one process, so the same stored rule and moments."""
    from test_guard import APPLES as GUARD_APPLES, OTHER   # the sets tests/test_guard.py makes its guard from

    forget, retain = tmp_path / "apples.jsonl", tmp_path / "other.jsonl"
    forget.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in GUARD_APPLES))
    retain.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in OTHER))
    made = {}
    for mode, extra in (("single", ["--no-progress"]), ("ray", RAY)):
        out = tmp_path / f"{mode}.npz"
        assert main(["guard", "--model", str(model_dir), "--forget", str(forget), "--retain", str(retain),
                     "--no-default-retain", "--limit", "40", "--batch-size", "4", "--out", str(out), *extra]) == 0
        made[mode] = out
    single, distributed = load_stats(made["single"]), load_stats(made["ray"])
    assert single.guard is not None and distributed.guard.to_json() == single.guard.to_json()
    assert single.guard.rule == "linear"   # the rule fitted on the kept keys and their means
    assert_same_stats(made["single"], made["ray"])


def test_eval_on_ray_gives_the_same_per_item_results(cluster, model_dir, prompt_files, llama_stats, data_dir,
                                                     tmp_path):
    results = {}
    for mode, extra in (("single", ["--no-progress"]), ("ray", RAY)):
        out = tmp_path / f"{mode}.json"
        assert main(["eval", "--model", str(model_dir), "--tasks", f"{prompt_files / 'forget.jsonl'},bypass:gsm8k",
                     "--stats", f"apples={llama_stats[1]}", "--limit", "20", "--gen-limit", "4", "--data-dir",
                     str(data_dir), "--no-cache", "--out", str(out), *extra]) == 0
        results[mode] = json.loads(out.read_text())["tasks"]
    single, distributed = results["single"], results["ray"]
    tokens = str(prompt_files / "forget.jsonl")
    assert distributed[tokens]["per_item"] == single[tokens]["per_item"]   # hits and tokens per item
    # each actor batches its own items: the same rows, so the same floats up to batch-shape rounding
    np.testing.assert_allclose(distributed[tokens]["entry"]["apples"], single[tokens]["entry"]["apples"], rtol=1e-5)
    np.testing.assert_allclose(distributed[tokens]["nll"], single[tokens]["nll"], rtol=1e-5)
    # the bypass benchmark's prefills are planned as in one process: the very same keys
    assert distributed["bypass:gsm8k"]["sets"] == single["bypass:gsm8k"]["sets"]


def test_without_ray_the_cli_imports_and_refuses_ray_in_one_line(tmp_path):
    """ray is imported lazily: with it blocked, `unskill` still builds its parser and --ray is one clear error."""
    code = ("import sys; sys.modules['ray'] = None\n"
            "from unskill.cli import main\n"
            f"sys.exit(main(['stats', '--model', 'm', '--forget', 'builtin:math', '--out', {str(tmp_path / 'x.npz')!r},"
            " '--ray']))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.strip() == "error: --ray needs Ray: pip install 'unskill[ray]'"
    assert not (tmp_path / "x.npz").exists()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_serve_replicas_answer_concurrent_requests_as_ksd_run(cluster, model_dir, llama_stats):
    """32 concurrent chat requests (apples refused, the rest answered) through Serve's one endpoint: the same
    greedy text and refusals as the runtime (ksd-run's path) gives for each prompt alone."""
    openai = pytest.importorskip("openai")
    from ray import serve

    from unskill.cli import build_parser
    from unskill.cluster.serve import APP_NAME, deploy
    from unskill.runtime import load
    from unskill.runtime.generator import GenerationParams
    from unskill.serve import build_server, check_args

    prompts = [APPLES[i] if i % 2 else CODE[i % len(CODE)] for i in range(32)]
    generator = load(model_dir, stats=[llama_stats[1]], rule="paper", device="cpu")
    expected = [generator.generate([p], GenerationParams(max_new_tokens=8))[0] for p in prompts]
    assert any(r.abstained for r in expected) and not all(r.abstained for r in expected)

    args = build_parser().parse_args(["serve", "--model", str(model_dir), "--stats", str(llama_stats[1]), "--rule", "paper", "--ray",
                                      "--replicas", "2", "--port", str(free_port()), "--model-name", "tiny"])
    check_args(args)
    url = deploy(args, build_server)
    try:
        assert serve.status().applications[APP_NAME].deployments["guarded"].replica_states.get("RUNNING") == 2
        api = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)

        def ask(prompt):
            return api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                               max_tokens=8, temperature=0).choices[0]
        with ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(ask, prompts))
    finally:
        serve.delete(APP_NAME)
    for answer, result in zip(answers, expected):
        assert answer.message.content == result.text
        assert answer.model_extra["unskill"]["abstained"] is result.abstained
        assert (answer.finish_reason == "content_filter") is result.abstained
