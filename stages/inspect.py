"""`arra-pipe inspect`: a one-screen summary of a feature set, read from its manifest alone."""

from __future__ import annotations

from pipeline.data.featureset import COLUMNS, IMAGE, FeatureSet


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
    columns = fs.columns
    stats = {**m["feature_stats"], **{n: c["feature_stats"] for n, c in columns.items() if c["kind"] == "teacher"}}
    for name, t in fs.teachers.items():
        st = stats[name]
        norm = f"|f| {st['norm_mean']:.3g} ± {st['norm_std']:.3g}" if st["rows"] else "no rows"
        bad = f", {st['nonfinite_rows']} rows non-finite!" if st["nonfinite_rows"] else ""
        where = f"added in {COLUMNS}/{name}/ ({_mb(sum(s['bytes'] for s in columns[name]['shards']))})" if name in columns else "in the shards"
        lines.append(f"teacher      {name}  {t['dim']}-d {t['aggregation']} @{t['input_size']} px, column feat.{name} "
                     f"float16 {where}, {norm}{bad}, weights {t['weights']} sha256 {t['weights_sha256'][:12]}")
    if IMAGE in columns:
        kept = columns[IMAGE]
        lines.append(f"images       canonical crops kept as {kept['encoding'].upper()} in {COLUMNS}/{IMAGE}/, "
                     f"{_mb(sum(s['bytes'] for s in kept['shards']))}")
    unfinished = sorted(p.name for p in (fs.path / COLUMNS).glob("*") if p.is_dir() and p.name not in columns)
    if unfinished:
        lines.append(f"unfinished   columns {', '.join(unfinished)} are being added (re-run the command to resume)")
    rej = m["rejects"]
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(rej["by_reason"].items(), key=lambda kv: -kv[1]))
    lines.append(f"rejects      {rej['total']}" + (f": {reasons} (see {rej['file']})" if rej["total"] else ""))
    if m.get("skipped"):
        lines.append("skipped      " + ", ".join(f"{k}: {v}" for k, v in m["skipped"].items()))
    return "\n".join(lines)
