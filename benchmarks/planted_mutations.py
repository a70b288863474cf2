"""The planted mutations of issue 20: each is a small bug that silently ruins results (a sign, a
pairing, a boundary moved by one, a check removed), and each must make the tests meant to catch it
fail. Slow (some catching tests train or extract), so not part of the suite: run it by hand after
changing those tests or the code they pin.

    nice -n 15 .venv/bin/python benchmarks/planted_mutations.py              # every mutation
    nice -n 15 .venv/bin/python benchmarks/planted_mutations.py gva-sign top-k-off   # some of them
    .venv/bin/python benchmarks/planted_mutations.py --list
    .venv/bin/python benchmarks/planted_mutations.py --report-only   # rebuild planted.md from planted.json

For each mutation the committed tree (`git archive HEAD`, so nobody's uncommitted edits) is copied
to a scratch folder, one source line is edited there (an exact old -> new replacement that must occur
exactly once, so a mutation that no longer applies is an error, not a pass), and only the catching
tests run there, with PYTHONPATH on the copy (checked: `pipeline` and `stages` import from it).
Killed = pytest ran the tests and at least one failed (exit status 1); exit status 0 = survived;
anything else (collection error, timeout) = error, which is not counted as a kill. Before the
mutations, the catching tests run once on the unmutated copy and must pass, so a kill is the
mutation's doing. Writes docs/benchmarks/mutation/planted.json and planted.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "benchmarks" / "mutation"


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str          # the bug, in words
    file: str
    old: str           # must occur exactly once in `file`
    new: str
    tests: tuple[str, ...]


T_OBJ = "tests/test_objective.py"
T_SAMPLE = "tests/test_sampling_numbers.py"
T_SPLIT = "tests/test_rank_split.py"
T_RESUME = "tests/test_train.py::test_resume_across_an_epoch_with_dropout_accumulation_and_a_schedule_is_exact"

MUTATIONS = [
    Mutation("gva-sign", "GVA `1 - cos` -> `1 + cos`", "pipeline/lm/arra.py",
             "return (1 - F.cosine_similarity(student, target, dim=-1)).mean()",
             "return (1 + F.cosine_similarity(student, target, dim=-1)).mean()", (T_OBJ,)),
    Mutation("teacher-rows", "teacher targets paired with the wrong rows of the batch", "pipeline/lm/arra.py",
             "target = teacher[align_mask.nonzero(as_tuple=True)[0]]",
             "target = teacher.roll(1, 0)[align_mask.nonzero(as_tuple=True)[0]]", (T_OBJ,)),
    Mutation("lambda-dropped", "λ dropped from `loss + λ·GVA`", "pipeline/lm/arra.py",
             "loss = loss + self.objective.lam * gva", "loss = loss + gva", (T_OBJ,)),
    Mutation("align-layer", "GVA on the hidden state one block past `--align-layer`", "pipeline/lm/arra.py",
             "hidden = out.hidden_states[self.objective.align_layer][align_mask]",
             "hidden = out.hidden_states[self.objective.align_layer + 1][align_mask]", (T_OBJ,)),
    Mutation("mse-abs", "`--align-loss mse` as the absolute error", "pipeline/lm/arra.py",
             "return (student - target).pow(2).mean()", "return (student - target).abs().mean()", (T_OBJ,)),
    Mutation("guidance-away", "guidance `uncond − cond` (pointing away from the condition)", "pipeline/lm/generate.py",
             "return cond + (scale - 1.0) * (cond - uncond)", "return cond + (scale - 1.0) * (uncond - cond)", (T_SAMPLE,)),
    Mutation("top-k-off", "top-k switched off", "pipeline/lm/generate.py",
             "if 0 < s.top_k < logits.shape[-1]:", "if False:", (T_SAMPLE,)),
    Mutation("top-p-boundary", "top-p boundary moved by one token (the token that reaches p dropped)",
             "pipeline/lm/generate.py",
             "drop = cumulative - sorted_logits.softmax(-1) >= s.top_p",
             "drop = cumulative >= s.top_p", (T_SAMPLE,)),
    Mutation("temperature-off", "temperature ignored", "pipeline/lm/generate.py",
             "logits = logits / s.temperature", "logits = logits * 1.0", (T_SAMPLE,)),
    Mutation("train-every-shard", "every rank reads every shard in training", "pipeline/data/train_data.py",
             "return list(ids[rank::self.world] if self.by_shard else ids)", "return list(ids)", (T_SPLIT,)),
    Mutation("steps-largest-rank", "steps per epoch from the largest rank (uneven shards: a rank runs dry)",
             "pipeline/data/train_data.py",
             "return min(self.rows_of_rank(r) for r in range(self.world))",
             "return max(self.rows_of_rank(r) for r in range(self.world))", (T_SPLIT,)),
    Mutation("rep-token-span", "`--align-positions rep-token` aligns every image position instead of `<rep>`",
             "pipeline/data/train_data.py",
             '"rep-token": (0, 1)}[align_positions]', '"rep-token": (boi, n)}[align_positions]',
             ("tests/test_train_data_layout.py::test_a_rep_layout_puts_rep_between_the_condition_and_boi_and_aligns_it_alone",)),
    Mutation("extract-every-shard", "every rank extracts every shard", "stages/extract.py",
             "mine = [s for s in range(ranks.rank, n_shards, ranks.world)",
             "mine = [s for s in range(0, n_shards, 1)",
             (f"{T_SPLIT}::test_extraction_rank_writes_only_the_shards_it_owns",)),
    Mutation("rng-restore-removed", "RNG restore removed on resume", "stages/train.py",
             '    torch.set_rng_state(state["rng"])\n', "    pass\n", (T_RESUME,)),
    Mutation("resume-epoch-0", "epoch forced to 0 on resume (an epoch entered part-way reads epoch 0's stream)",
             "stages/train.py",
             "epoch, done = divmod(step, per_epoch)",
             "epoch, done = divmod(step, per_epoch) if step % per_epoch == 0 else (0, step % per_epoch)", (T_RESUME,)),
    Mutation("no-epoch-rebuild", "stream rebuild at an epoch boundary removed (the epoch's stream runs on)",
             "stages/train.py",
             "steps = min(per_epoch - done, total - step)", "steps = total - step", (T_RESUME,)),
    Mutation("dinov2-last-token", "DINOv2 returns the last patch token instead of CLS", "pipeline/models/hf_teachers.py",
             "h = self.net(pixel_values=x).last_hidden_state\n        return h[:, 0], h[:, 1:]",
             "h = self.net(pixel_values=x).last_hidden_state\n        return h[:, -1], h[:, 1:]",
             ("tests/test_teacher_reference.py::test_dinov2_is_the_final_norm_cls_token",)),
    Mutation("efficientnet-maxpool", "EfficientNet-Lite's global feature max-pooled instead of averaged",
             "pipeline/models/teachers.py",
             "return self.net.extract_features(x).mean(dim=(2, 3))", "return self.net.extract_features(x).amax(dim=(2, 3))",
             ("tests/test_teacher_reference.py::test_efficientnet_lite_is_the_pooled_input_of_its_classifier",)),
    Mutation("verify-unlisted", "verify's unlisted-file check removed", "pipeline/data/featureset.py",
             'problems += _unlisted(self.path, SHARDS, self.manifest["shards"])', "pass",
             ("tests/test_featureset.py::test_verify_reports_tars_that_no_manifest_lists",)),
    Mutation("verify-rows", "verify's row-count check removed", "pipeline/data/featureset.py",
             'if rows != entry["rows"]:', "if False:",
             ("tests/test_featureset.py::test_verify_counts_the_rows_of_every_tar",)),
    Mutation("reject-claims-key", "a rejected row claims its key (a later good row becomes a duplicate)",
             "pipeline/data/sources.py",
             "        elif r.reject is None:\n            first[r.key] = r.origin",
             "        else:\n            first[r.key] = r.origin",
             ("tests/test_sources.py::test_a_rejected_row_does_not_claim_its_key",)),
    Mutation("negative-labels", "negative labels accepted", "pipeline/data/sources.py",
             "if not -1 <= label < 2 ** 31:", "if not label < 2 ** 31:",
             ("tests/test_sources.py::test_negative_labels_other_than_none_are_bad_rows",)),
    Mutation("init-grid-check", "the `--init` grid check skipped", "stages/train.py",
             "if layout.grid != grid:", "if False:",
             ("tests/test_train.py::test_init_from_another_grid_or_codebook_is_refused",)),
]


def copy_tree(dest: Path) -> None:
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def env_for(tree: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(tree), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONDONTWRITEBYTECODE": "1"}


def check_imports(tree: Path) -> None:
    code = "import pipeline, stages; print(pipeline.__file__); print(stages.__file__)"
    where = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env_for(tree), capture_output=True, text=True,
                           check=True).stdout.split()
    assert all(Path(w).resolve().is_relative_to(tree.resolve()) for w in where), f"imports from {where}, not {tree}"


def run_tests(tree: Path, tests: tuple[str, ...], timeout: int) -> tuple[str, float, str]:
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    started = time.monotonic()
    try:
        done = subprocess.run(command, cwd=tree, env=env_for(tree), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "error (timeout)", time.monotonic() - started, ""
    seconds = time.monotonic() - started
    outcome = {0: "survived", 1: "killed"}.get(done.returncode, f"error (pytest exit {done.returncode})")
    lines = [line for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR")) or
             re.search(r"\d+ (passed|failed).* in [\d.]+s", line)]
    return outcome, seconds, " | ".join(lines[-3:])


def apply(tree: Path, m: Mutation) -> None:
    path = tree / m.file
    text = path.read_text()
    count = text.count(m.old)
    if count != 1:
        raise SystemExit(f"{m.name}: {m.old!r} occurs {count} times in {m.file}, not once: update the mutation")
    path.write_text(text.replace(m.old, m.new))


def write_outputs(new: list[dict]) -> None:
    """planted.json and planted.md: this run's results, and the stored ones of mutations not run again."""
    OUT.mkdir(parents=True, exist_ok=True)
    stored = json.loads((OUT / "planted.json").read_text())["results"] if (OUT / "planted.json").exists() else []
    by_name = {r["name"]: r for r in stored} | {r["name"]: r for r in new}
    results = [by_name[m.name] for m in MUTATIONS if m.name in by_name]
    (OUT / "planted.json").write_text(json.dumps({"results": results}, indent=1) + "\n")
    killed = sum(r["outcome"] == "killed" for r in results)
    runs = sorted({(r["command"], r["commit"][:12], r["date"]) for r in results})
    lines = ["# Planted mutations (issue 20)", "",
             "Written by `benchmarks/planted_mutations.py` (see its docstring). Each row: one source edit in a",
             "scratch copy of the committed tree, then only the catching tests run there. Killed = a test failed;",
             "the catching tests passed on the unmutated copy first.", "",
             f"**{killed} of {len(results)} killed.** Runs: "
             + "; ".join(f"`{c}` at commit `{h}` ({d})" for c, h, d in runs) + ".", "",
             "| mutation | file | edit | catching test(s) run | result: the test that failed | s |",
             "|---|---|---|---|---|---|"]
    for r in results:
        edit = f"`{r['old'].strip().splitlines()[-1].strip()}` → `{r['new'].strip().splitlines()[-1].strip()}`"
        tests = "<br>".join(f"`{t}`" for t in r["tests"])
        failed = [p.split()[1] for p in r["summary"].split(" | ") if p.startswith("FAILED")]
        result = r["outcome"] + (f": `{failed[0].removeprefix('tests/')}`" if failed else "")
        lines.append(f"| {r['what']} | `{r['file']}` | {edit} | {tests} | {result} | {r['seconds']:.0f} |")
    (OUT / "planted.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT / 'planted.md'}: {killed} of {len(results)} killed")


def head() -> str:
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per test run")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the catching tests")
    parser.add_argument("--report-only", action="store_true", help="rebuild planted.md from planted.json")
    args = parser.parse_args()
    if args.report_only:
        write_outputs([])
        return
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:22s} {m.file:32s} {' '.join(m.tests)}")
        return
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    if unknown := set(args.names) - {m.name for m in MUTATIONS}:
        parser.error(f"unknown mutations {sorted(unknown)}")
    command = "nice -n 15 .venv/bin/python benchmarks/planted_mutations.py" + "".join(f" {n}" for n in args.names)
    results, commit = [], head()
    with tempfile.TemporaryDirectory(prefix="arra-planted-") as scratch:
        clean = Path(scratch) / "clean"
        copy_tree(clean)
        check_imports(clean)
        for m in chosen:  # every mutation applies to the committed tree, before anything runs
            probe = (clean / m.file).read_text().count(m.old)
            if probe != 1:
                raise SystemExit(f"{m.name}: {m.old!r} occurs {probe} times in {m.file}, not once")
        if not args.no_baseline:
            tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
            outcome, seconds, summary = run_tests(clean, tests, args.timeout * 2)
            print(f"baseline ({seconds:.0f} s): {summary}", flush=True)
            if outcome != "survived":
                raise SystemExit(f"the catching tests fail on the unmutated tree: {outcome} {summary}")
        for i, m in enumerate(chosen, 1):
            tree = Path(scratch) / m.name
            shutil.copytree(clean, tree, symlinks=True)
            apply(tree, m)
            outcome, seconds, summary = run_tests(tree, m.tests, args.timeout)
            print(f"[{i}/{len(chosen)}] {outcome:9s} {m.name} ({seconds:.0f} s): {summary}", flush=True)
            results.append({"name": m.name, "what": m.what, "file": m.file, "old": m.old, "new": m.new,
                            "tests": list(m.tests), "outcome": outcome, "seconds": round(seconds, 1), "summary": summary,
                            "command": command, "commit": commit, "date": time.strftime("%Y-%m-%d")})
            shutil.rmtree(tree)
    write_outputs(results)
    if any(r["outcome"] != "killed" for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
