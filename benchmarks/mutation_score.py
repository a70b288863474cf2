"""Mutation score of the modules that hold the numbers, with cosmic-ray. Slow: not part of the test
suite, run it by hand after changing one of these modules or its tests.

    nice -n 10 .venv/bin/python benchmarks/mutation_score.py pipeline/lm/vocab.py pipeline/lm/generate.py
    .venv/bin/python benchmarks/mutation_score.py --list          # the modules and their test selections
    .venv/bin/python benchmarks/mutation_score.py --report-only   # rebuild the report from stored results
    .venv/bin/python benchmarks/mutation_score.py --survivors pipeline/lm/vocab.py   # after adding tests: survivors only

cosmic-ray rather than mutmut: mutmut 3 leaves decorated functions unmutated (its trampolines cannot
wrap them), and here those are every VocabLayout property and `generate` itself.

Needs the `mutation` extra (`pip install -e .[mutation]`). Each module is mutated in a scratch copy
of the working tree (cosmic-ray rewrites the file it mutates, so never in place), one mutant at a
time, and only that module's fast tests run against each mutant, stopping at the first failure;
a run that outlives the time limit counts as killed. Operators that only make noise are left out
(bit, shift, power and modulo replacements, `x < y` -> `x is y`, the unary forms that duplicate
`-x` -> `x`), and so is everything inside type annotations (never evaluated here, as every module
has `from __future__ import annotations`). For the larger modules only the functions that hold the
numbers are mutated (`Target.functions`).

A mutant the tests let through either computes the same thing as the original (equivalent: listed
with the reason in benchmarks/mutation_equivalent.toml, matched by the original and the mutated
line) or shows a gap that needs a test. Score = killed / (mutants - equivalent - incompetent, the
mutants cosmic-ray could not run). Results go to
docs/benchmarks/mutation/<module>.json and the summary with every survivor to
docs/benchmarks/mutation/report.md.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "benchmarks" / "mutation"
EQUIVALENT = ROOT / "benchmarks" / "mutation_equivalent.toml"
COPY = ("pipeline", "stages", "manifests", "tests", "data", "pyproject.toml")

EXCLUDED_OPERATORS = (
    r"core/ReplaceBinaryOperator_\w+_(BitAnd|BitOr|BitXor|LShift|RShift|Pow|Mod|MatMult)$",
    r"core/ReplaceComparisonOperator_(Eq|NotEq|Lt|LtE|Gt|GtE)_(Is|IsNot)$",
    r"core/ReplaceUnaryOperator_USub_(UAdd|Invert|Not)$",
)


@dataclass(frozen=True)
class Target:
    tests: tuple[str, ...]                  # pytest arguments: the fast tests that pin this module
    functions: tuple[str, ...] = ()         # qualified names to mutate; empty: the whole module


TARGETS = {
    "pipeline/lm/arra.py": Target(("tests/test_arra_options.py", "tests/test_objective.py",
                                "tests/test_sequences.py::test_gva_sees_only_the_masked_hidden_states")),
    "pipeline/lm/objective.py": Target(("tests/test_objective_ranges.py", "tests/test_arra_options.py", "tests/test_objective.py",
                                     "tests/test_options.py::test_every_declared_option_is_a_flag_of_its_commands_with_its_default",
                                     "tests/test_options.py::test_the_cli_and_the_python_api_refuse_the_same_values_naming_the_flag")),
    "pipeline/lm/vocab.py": Target(("tests/test_vocab_layout.py", "tests/test_sampling_numbers.py",
                                 "tests/test_sequences.py", "tests/test_objective.py")),
    "pipeline/lm/generate.py": Target(("tests/test_generate_inputs.py", "tests/test_sampling_numbers.py", "tests/test_sample.py")),
    "pipeline/data/train_data.py": Target(("tests/test_train_data_layout.py", "tests/test_exclude_per_rank.py", "tests/test_train_stream.py",
                                      "tests/test_sequences.py", "tests/test_objective.py", "tests/test_rank_split.py"),
                                     ("make_sequences", "Conditioner.__call__", "TrainStream.rank_shards",
                                      "TrainStream.rows_of_rank", "TrainStream.steps_per_epoch", "TrainStream._rows",
                                      "TrainStream._excluded_rows", "TrainStream.epoch")),
    "pipeline/data/featureset.py": Target(("tests/test_featureset_keys.py", "tests/test_check_tar.py", "tests/test_verify_rejects.py",
                                      "tests/test_featureset.py::test_verify_reports_tars_that_no_manifest_lists",
                                      "tests/test_featureset.py::test_verify_counts_the_rows_of_every_tar",
                                      "tests/test_featureset.py::test_verify_catches_flipped_byte_and_truncation",
                                      "tests/test_corrupt_sets.py::test_non_finite_teacher_features_are_refused_naming_the_row",
                                      "tests/test_corrupt_sets.py::test_verify_reports_a_deleted_rejects_file"),
                                     ("FeatureSet.verify", "FeatureSet._rejects_problems", "_alignment", "_unlisted",
                                      "check_tar", "_non_finite", "keys_mismatch")),
    "pipeline/data/sources.py": Target(("tests/test_source_text.py", "tests/test_source_tables.py", "tests/test_source_idx.py",
                                   "tests/test_sources.py::test_a_rejected_row_does_not_claim_its_key",
                                   "tests/test_sources.py::test_negative_labels_other_than_none_are_bad_rows",
                                   "tests/test_sources.py::test_table_without_recognisable_columns",
                                   "tests/test_sources.py::test_table_caption_template_with_missing_column",
                                   "tests/test_sources.py::test_fashion_mnist_sources_without_extracting",
                                   "tests/test_bad_input.py::test_rows_the_readers_cannot_take_are_rejects_not_failures",
                                   "tests/test_bad_input.py::test_label_outside_int32_is_a_bad_row",
                                   "tests/test_bad_input.py::test_malformed_conversation_items_and_jsonl_lines_are_bad_rows",
                                   "tests/test_bad_input.py::test_csv_row_with_extra_fields_is_a_bad_row_not_a_truncated_caption"),
                                  ("_reject_duplicates", "_text", "_read_table", "_read_fashion_mnist")),
}


def spans(source: str, functions: tuple[str, ...]) -> tuple[list[tuple[int, int]], list[tuple[tuple[int, int], tuple[int, int]]]]:
    """(line spans of the selected functions, decorators included; (start, end) positions of every
    type annotation)."""
    tree = ast.parse(source)
    selected, annotations = [], []

    def walk(node, prefix: str):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                if name in functions:
                    first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                    selected.append((first, child.end_lineno))
                walk(child, name + ".")
            else:
                walk(child, prefix)

    walk(tree, "")
    for node in ast.walk(tree):
        for ann in ([node.annotation] if isinstance(node, (ast.arg, ast.AnnAssign)) else
                    [node.returns] if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else []):
            if ann is not None:
                annotations.append(((ann.lineno, ann.col_offset), (ann.end_lineno, ann.end_col_offset)))
    return selected, annotations


def skip_reason(mutation, target: Target, selected, annotations) -> str | None:
    if any(re.match(p, mutation.operator_name) for p in EXCLUDED_OPERATORS):
        return "operator"
    start = tuple(mutation.start_pos)
    if any(a <= start < b for a, b in annotations):
        return "annotation"
    if target.functions and not any(a <= start[0] <= b for a, b in selected):
        return "outside the selected functions"
    return None


def changed_lines(diff: str) -> tuple[str, str]:
    minus = [line[1:].strip() for line in diff.splitlines() if line.startswith("-") and not line.startswith("---")]
    plus = [line[1:].strip() for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    minus, plus = [m for m in minus if m], [p for p in plus if p]
    return " / ".join(minus), " / ".join(plus)


def pytest_command(target: Target) -> list[str]:
    return [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *target.tests]


def run_module(module: str, scratch: Path, stored: dict | None = None) -> dict:
    """Mutate `module` against its tests; with `stored` (an earlier result of the same source), only
    that run's survivors are tested again and its other outcomes kept."""
    from cosmic_ray.commands import init
    from cosmic_ray.mutating import mutate_and_test
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome, WorkResult

    target = TARGETS[module]
    work = scratch / module.replace("/", "_").removesuffix(".py")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, work / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, work / name)
    os.chdir(work)
    source = Path(module).read_text()
    selected, annotations = spans(source, target.functions)
    if target.functions and len(selected) != len(target.functions):
        raise SystemExit(f"{module}: some of {target.functions} are not functions of the module")

    command = pytest_command(target)
    print(f"{module}: baseline {' '.join(command[1:])}", flush=True)
    started = time.monotonic()
    baseline = subprocess.run(command, capture_output=True, text=True)
    baseline_s = time.monotonic() - started
    if baseline.returncode != 0:
        raise SystemExit(f"{module}: the unmutated tests fail, fix them first\n{baseline.stdout[-3000:]}")
    timeout = max(60.0, 4 * baseline_s)

    results, skipped = [], {}
    with use_db(str(work / "session.sqlite"), WorkDB.Mode.create) as db:
        init([Path(module)], db, {})
        items = list(db.pending_work_items)
        todo = []
        for item in items:
            why = skip_reason(item.mutations[0], target, selected, annotations)
            if why:
                skipped[why] = skipped.get(why, 0) + 1
                db.set_result(item.job_id, WorkResult(worker_outcome=WorkerOutcome.SKIPPED, output=why))
            else:
                todo.append(item)
        todo.sort(key=lambda it: tuple(it.mutations[0].start_pos))
        if stored:
            results = [m for m in stored["mutants"] if m["outcome"] != "survived"]
            # matched by operator and occurrence (lines may have moved), the mutated line's text unchanged
            again = {(m["operator"], m["occurrence"]): m["original"] for m in stored["mutants"] if m["outcome"] == "survived"}
            todo = [it for it in todo if (it.mutations[0].operator_name, it.mutations[0].occurrence) in again]
            lines = source.splitlines()
            if len(todo) != len(again) or any(lines[it.mutations[0].start_pos[0] - 1].strip() !=
                                              again[it.mutations[0].operator_name, it.mutations[0].occurrence] for it in todo):
                raise SystemExit(f"{module} changed since its stored run: run it whole")
        print(f"{module}: {len(todo)} mutants ({len(items) - len(todo)} left out: {skipped}), "
              f"baseline {baseline_s:.0f} s, limit {timeout:.0f} s each", flush=True)
        started = time.monotonic()
        for i, item in enumerate(todo, 1):
            mutation = item.mutations[0]
            result = mutate_and_test(item.mutations, shlex.join(command), timeout)
            db.set_result(item.job_id, result)
            orig, mutant = changed_lines(result.diff or "")
            outcome = ("incompetent" if result.test_outcome in (None, TestOutcome.INCOMPETENT) else
                       "timeout" if result.output == "timeout" else result.test_outcome.value)
            results.append({"line": mutation.start_pos[0], "operator": mutation.operator_name,
                            "occurrence": mutation.occurrence, "original": orig, "mutant": mutant, "outcome": outcome})
            left = (time.monotonic() - started) / i * (len(todo) - i)
            print(f"  [{i}/{len(todo)}] {outcome:9s} line {mutation.start_pos[0]}: {mutant}  (~{left / 60:.0f} min left)",
                  flush=True)
        assert Path(module).read_text() == source, "cosmic-ray left the module mutated"
    seconds = round(time.monotonic() - started)
    results.sort(key=lambda m: (m["line"], m["operator"], m["occurrence"]))
    return {"module": module, "tests": list(target.tests), "functions": list(target.functions),
            "excluded_operators": list(EXCLUDED_OPERATORS), "left_out": skipped, "baseline_seconds": round(baseline_s, 1),
            "seconds": stored["seconds"] + seconds if stored else seconds, "date": time.strftime("%Y-%m-%d"), "mutants": results,
            **({"survivors_retested": {"mutants": len(todo), "seconds": seconds}} if stored else {})}


def load_equivalent() -> dict[tuple[str, str, str], str]:
    entries = tomllib.loads(EQUIVALENT.read_text())["equivalent"] if EQUIVALENT.exists() else []
    return {(e["module"], e["line"], e["mutant"]): e["why"] for e in entries}


def summarize(result: dict, equivalent: dict) -> dict:
    mutants = result["mutants"]
    survived = [m for m in mutants if m["outcome"] == "survived"]
    for m in survived:
        m["why"] = equivalent.get((result["module"], m["original"], m["mutant"]))
    eq = sum(m["why"] is not None for m in survived)
    killed = sum(m["outcome"] in ("killed", "timeout") for m in mutants)
    counted = len(mutants) - eq - sum(m["outcome"] == "incompetent" for m in mutants)
    return {"mutants": len(mutants), "killed": killed, "survived": len(survived), "equivalent": eq,
            "incompetent": sum(m["outcome"] == "incompetent" for m in mutants),
            "score": killed / counted if counted else 1.0, "survivors": survived}


def write_report() -> None:
    equivalent = load_equivalent()
    results = [r for r in (json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))) if "mutants" in r]  # not planted.json
    lines = ["# Mutation score", "",
             "Written by `benchmarks/mutation_score.py` (cosmic-ray; see its docstring for what is mutated and how).",
             "Score = killed / (mutants − equivalent − incompetent); a survivor is either equivalent (why given)",
             "or a gap that needs a test.", "",
             "| module | mutants | killed | survived | equivalent | score (non-equivalent killed) | tests | date |",
             "|---|---|---|---|---|---|---|---|"]
    sections = []
    for r in results:
        s = summarize(r, equivalent)
        lines.append(f"| `{r['module']}` | {s['mutants']} | {s['killed']} | {s['survived']} | {s['equivalent']} | "
                     f"{100 * s['score']:.1f} % | {', '.join(f'`{t}`' for t in r['tests'])} | {r['date']} |")
        scope = f"functions {', '.join(f'`{f}`' for f in r['functions'])}" if r["functions"] else "the whole module"
        sections += ["", f"## `{r['module']}`", "",
                     f"Mutated: {scope}; left out: {r['left_out'] or 'nothing'}. {s['mutants']} mutants in "
                     f"{r['seconds'] / 60:.0f} min (baseline test run {r['baseline_seconds']} s)."
                     + (f" The survivors tested again after tests were added: {r['survivors_retested']['mutants']} in "
                        f"{r['survivors_retested']['seconds'] / 60:.0f} min." if "survivors_retested" in r else "")
                     + (f" {s['incompetent']} incompetent (cosmic-ray could not run them)." if s["incompetent"] else ""), ""]
        if not s["survivors"]:
            sections.append("No survivors.")
        for m in s["survivors"]:
            why = m["why"] or "**needs a test**"
            sections.append(f"- line {m['line']}: `{m['original']}` → `{m['mutant']}` — {why}")
    (OUT / "report.md").write_text("\n".join(lines + sections) + "\n")
    print(f"wrote {OUT / 'report.md'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help=f"modules to mutate, from: {', '.join(TARGETS)}")
    parser.add_argument("--list", action="store_true", help="print the modules and their test selections")
    parser.add_argument("--report-only", action="store_true", help="rebuild report.md from the stored results")
    parser.add_argument("--survivors", action="store_true",
                        help="test only the stored run's survivors again (after adding tests; the module must be unchanged)")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/arra-mutation"), help="where the copies of the tree go")
    args = parser.parse_args()
    if args.list:
        for module, target in TARGETS.items():
            print(module, "->", " ".join(target.tests), f"(functions: {', '.join(target.functions)})" if target.functions else "")
        return
    unknown = [m for m in args.modules if m not in TARGETS]
    if unknown:
        parser.error(f"not a target: {unknown}; choose from {list(TARGETS)}")
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONDONTWRITEBYTECODE="1")
    OUT.mkdir(parents=True, exist_ok=True)
    for module in ([] if args.report_only else args.modules):
        stored = OUT / (Path(module).stem + ".json")
        result = run_module(module, args.scratch, json.loads(stored.read_text()) if args.survivors else None)
        stored.write_text(json.dumps(result, indent=1) + "\n")
    write_report()


if __name__ == "__main__":
    main()
