"""verify's own checks on a hand-made manifest: rejects.jsonl against the manifest's count (fewer,
more, unreadable), and a manifest that lacks a key named instead of a crash."""

from __future__ import annotations

import json

from pipeline.data.featureset import FeatureSet, read_manifest


def feature_set(tmp_path, manifest: dict, rejects: str | None) -> FeatureSet:
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    if rejects is not None:
        (tmp_path / "rejects.jsonl").write_text(rejects, encoding="utf-8")
    return FeatureSet(tmp_path, read_manifest(tmp_path / "manifest.json"))


def test_rejects_file_against_the_manifests_count(tmp_path):
    line = json.dumps({"key": "a", "reason": "corrupt"}) + "\n"
    manifest = {"rejects": {"total": 2}, "shards": []}
    assert feature_set(tmp_path, manifest, 2 * line)._rejects_problems() == []
    assert feature_set(tmp_path, manifest, line)._rejects_problems() == ["rejects.jsonl: 1 rejects, manifest says 2"]
    assert feature_set(tmp_path, manifest, 3 * line)._rejects_problems() == ["rejects.jsonl: 3 rejects, manifest says 2"]
    problems = feature_set(tmp_path, manifest, line + "{not json\n")._rejects_problems()
    assert len(problems) == 1 and problems[0].startswith("rejects.jsonl: unreadable (")


def test_a_manifest_without_a_key_is_one_named_problem(tmp_path):
    problems = feature_set(tmp_path, {"shards": []}, "").verify()
    assert len(problems) == 1 and "no key 'rejects'" in problems[0] and "manifest.json" in problems[0]
