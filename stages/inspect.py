"""`arra-pipe inspect`: a one-screen summary of a feature set, read from its manifest alone."""

from __future__ import annotations

from pipeline.featureset import FeatureSet


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def describe(path) -> str:
    fs = FeatureSet.open(path)
    m = fs.manifest
    rows, tok, src, pre = m["rows"], m["tokenizer"], m["source"], m["preprocess"]
    total = sum(s["bytes"] for s in m["shards"])
    per_row = total / rows if rows else 0.0
    payload = m["payload_bytes"] / rows if rows else 0.0
    lines = [
        f"feature set  {fs.path}  (format v{m['version']}, made {m['created']} by arra-pipe {m['arra_pipe']})",
        f"source       {src['format']}  {src['path']}  ({src['records']} records, fingerprint {src['fingerprint'][:12]})",
        f"rows         {rows} in {len(m['shards'])} shards, {_mb(total)}; {per_row:.0f} B/row on disk, "
        f"{payload:.0f} B/row payload ({per_row / payload if payload else 0:.3f}x)",
        f"preprocess   {pre['crop']} crop {pre['resolution']} px ({pre['resample']}), teachers see the {pre['teacher_view']}",
        f"tokenizer    {tok['name']}  {tok['resolution']} px -> {tok['grid'][0]}x{tok['grid'][1]} codes, codebook "
        f"{tok['codebook_size']} ({m['schema']['codes']}), weights {tok['weights']} sha256 {tok['weights_sha256'][:12]}",
    ]
    for name, t in m["teachers"].items():
        st = m["feature_stats"][name]
        norm = f"|f| {st['norm_mean']:.3g} ± {st['norm_std']:.3g}" if st["rows"] else "no rows"
        bad = f", {st['nonfinite_rows']} rows non-finite!" if st["nonfinite_rows"] else ""
        lines.append(f"teacher      {name}  {t['dim']}-d {t['aggregation']} @{t['input_size']} px, column feat.{name} "
                     f"float16, {norm}{bad}, weights {t['weights']} sha256 {t['weights_sha256'][:12]}")
    rej = m["rejects"]
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(rej["by_reason"].items(), key=lambda kv: -kv[1]))
    lines.append(f"rejects      {rej['total']}" + (f": {reasons} (see {rej['file']})" if rej["total"] else ""))
    if m.get("skipped"):
        lines.append("skipped      " + ", ".join(f"{k}: {v}" for k, v in m["skipped"].items()))
    return "\n".join(lines)
