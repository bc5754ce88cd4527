"""The results: per-ratio means over videos, FVD, the average over ratios, the TELEA baseline's rows
(results.json), and the markdown table (results.md)."""

from __future__ import annotations

import math

import numpy as np

from m3ddm_jax import metrics
from m3ddm_jax.evaluation.protocol import ratio_key

IMAGE_METRICS = ("psnr", "ssim", "psnr_generated", "ssim_generated", "lpips")
TABLE = (("psnr", "PSNR", 2), ("ssim", "SSIM", 4), ("psnr_generated", "PSNR gen.", 2),
         ("ssim_generated", "SSIM gen.", 4), ("lpips", "LPIPS", 4), ("fvd", "FVD", 1))
TELEA = "telea"  # a record's and the report's scores of the TELEA baseline (telea_bands) on the same bands


def _image_means(records: list[dict]) -> dict[str, float]:
    return {metric: float(np.mean([rec[metric] for rec in records])) for metric in IMAGE_METRICS
            if records and metric in records[0]}


def _average(rows: dict[str, dict]) -> dict[str, float]:
    return {metric: float(np.mean([row[metric] for row in rows.values()])) for metric, *_ in TABLE
            if all(metric in row for row in rows.values())}


def summarize(per_video: dict[str, dict[str, dict]], failed: dict[str, str], ratios: list[float],
              skipped: dict[str, str], settings: dict) -> dict:
    """The report: per-ratio means over videos, FVD per ratio, their average over ratios; and the same image
    metrics of the TELEA baseline on the same bands (`telea`)."""
    rows, telea, notes = {}, {}, dict(skipped)
    for r in ratios:
        key = ratio_key(r)
        records = [per_video[name][key] for name in sorted(per_video)]
        row = {"videos": len(records), **_image_means(records)}
        telea[key] = {"videos": len(records), **_image_means([rec[TELEA] for rec in records])}
        if "fvd" not in skipped:
            pairs = [rec["i3d"] for rec in records if rec.get("i3d")]
            if len(pairs) >= 2:
                row["fvd"] = metrics.frechet_distance(np.array([p["real"] for p in pairs]),
                                                      np.array([p["fake"] for p in pairs]))
                row["fvd_videos"] = len(pairs)
            else:
                notes["fvd"] = f"needs at least 2 videos of >= {metrics.CLIP_FRAMES} frames; {len(pairs)} scored"
        rows[key] = row
    protocol = {"mask_ratios": ratios, "band": "round(ratio * width / 2) pixels per side",
                "ranges": {"psnr, ssim, fvd": "[0, 1]", "lpips": "[-1, 1]"},
                "means": "per video over frames, then over videos; average: over ratios"}
    return {"protocol": protocol,
            "settings": settings, "ratios": rows, "average": _average(rows),
            TELEA: {"ratios": telea, "average": _average(telea)}, "skipped_metrics": notes,
            "videos": sorted(per_video), "failed_videos": failed,
            "per_video": {name: {k: {**{m: v for m, v in rec.items() if m in IMAGE_METRICS}, TELEA: rec[TELEA]}
                                 for k, rec in per_video[name].items()} for name in sorted(per_video)}}


def markdown(results: dict) -> str:
    def cell(row, metric, digits):
        if metric not in row:
            return "—"
        value = row[metric]  # rounding first, + 0.0: a numerically negative zero (FVD -1e-12) prints as 0
        return "inf" if math.isinf(value) else f"{round(value, digits) + 0.0:.{digits}f}"

    columns = [c for c in TABLE if any(c[0] in row for row in results["ratios"].values())]
    s = results["settings"]
    of = f"predictions {s['predictions']}" if "predictions" in s else f"weights {s['weights']} ({s['steps']} steps)"
    size = "x".join(map(str, s["frame_size"])) or "source-size"
    lines = ["# Outpainting evaluation", "",
             f"{of} on {s['videos']}: {len(results['videos'])} videos scored, {len(results['failed_videos'])} "
             f"failed; {size} frames. Horizontal outpainting: mask ratio r generates round(r W / 2) pixels on each "
             f"side. PSNR, SSIM, FVD on [0, 1], LPIPS on [-1, 1]; 'gen.' = the generated bands only. 'TELEA "
             f"init': the same bands filled by OpenCV's TELEA inpainting (what the sampler starts from).", "",
             "| mask ratio | videos | " + " | ".join(c[1] for c in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    telea = results[TELEA]
    for key, row in [*results["ratios"].items(), ("average", results["average"]),
                     *((f"{k} TELEA init", v) for k, v in telea["ratios"].items()),
                     ("average TELEA init", telea["average"])]:
        videos = row.get("videos", "")
        lines.append(f"| {key} | {videos} | " + " | ".join(cell(row, m, d) for m, _, d in columns) + " |")
    if results["skipped_metrics"]:
        lines += ["", "Not reported:"] + [f"- {m.upper()}: {why}" for m, why in results["skipped_metrics"].items()]
    if results["failed_videos"]:
        lines += ["", "Failed videos (left out):"] + [f"- {n}: {e}" for n, e in results["failed_videos"].items()]
    return "\n".join(lines) + "\n"
