"""The demo report: DRR pictures, label overlays, a frame strip, an animated GIF and a metrics table
set beside the published method's numbers, written as one HTML page with PNG/GIF files."""
from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from ..fileio import atomic_path
# Imported where used, so that importing this module stays light: PIL (heavy or optional third-party packages).

# The published method this project starts from (see README): chamfer, enclosure at the acquisition
# pose and at unseen poses, DRR fidelity at the acquisition pose.
PUBLISHED = {"chamfer_mm": 15.8, "enclosure_pct": 95.9, "enclosure_target_pct": 94.4,
             "acq_ssim": 0.872, "acq_psnr_db": 18.5}

_COLORS = np.array([
    [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
    [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [220, 190, 255],
    [170, 110, 40], [255, 250, 200], [128, 0, 0], [170, 255, 195], [128, 128, 0], [255, 215, 180],
], dtype=np.float64)


def to_gray8(img, vmax=None) -> np.ndarray:
    """A line-integral DRR as 8-bit grey (attenuation bright, as on a radiograph)."""
    a = np.asarray(img, dtype=np.float64)
    top = float(np.percentile(a, 99.7)) if vmax is None else float(vmax)
    return (255.0 * np.clip(a / max(top, 1e-9), 0, 1)).astype(np.uint8)


def overlay(img, masks, names, alpha: float = 0.45, vmax=None, only=None) -> np.ndarray:
    """RGB overlay of projected label masks (S, H, W) on a DRR."""
    g = to_gray8(img, vmax).astype(np.float64)
    rgb = np.repeat(g[..., None], 3, axis=2)
    for i, n in enumerate(names):
        if only is not None and not only(str(n)):
            continue
        m = np.asarray(masks[i]) > 0
        c = _COLORS[i % len(_COLORS)]
        rgb[m] = (1 - alpha) * rgb[m] + alpha * c
    return rgb.clip(0, 255).astype(np.uint8)


def save_png(arr, path) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(np.asarray(arr)).save(tmp, format="PNG")


def save_gif(frames, path, fps: float = 12.0) -> None:
    from PIL import Image

    ims = [Image.fromarray(np.asarray(f)) for f in frames]
    with atomic_path(path) as tmp:
        ims[0].save(tmp, format="GIF", save_all=True, append_images=ims[1:], loop=0,
                    duration=int(round(1000.0 / fps)))


def strip(images, cols: int | None = None, pad: int = 4) -> np.ndarray:
    """Tile same-sized images (grey or RGB) into one row (or a grid of ``cols``)."""
    ims = [np.asarray(i) if np.asarray(i).ndim == 3 else np.repeat(np.asarray(i)[..., None], 3, 2) for i in images]
    h, w = ims[0].shape[:2]
    cols = cols or len(ims)
    rows = (len(ims) + cols - 1) // cols
    out = np.full((rows * (h + pad) - pad, cols * (w + pad) - pad, 3), 255, np.uint8)
    for k, im in enumerate(ims):
        r, c = divmod(k, cols)
        out[r * (h + pad): r * (h + pad) + h, c * (w + pad): c * (w + pad) + w] = im
    return out


def _fmt(v, nd=3):
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return html.escape(str(v))


def metrics_rows(metrics: dict) -> list[tuple]:
    """(metric, ours, published, better-is) rows from an ``evaluate`` result."""
    fit = metrics.get("fit", {})
    acq = metrics.get("acquisition", {})
    tgt = metrics.get("target", {})
    rows = [
        ("Chamfer distance, body model to CT skin (mm)", fit.get("chamfer_mm"), PUBLISHED["chamfer_mm"], "lower"),
        ("Skeletal enclosure, acquisition pose (%)", fit.get("enclosure_pct"), PUBLISHED["enclosure_pct"], "higher"),
        ("DRR SSIM, acquisition pose (AP+lateral mean)", acq.get("ssim"), PUBLISHED["acq_ssim"], "higher"),
        ("DRR PSNR, acquisition pose (dB)",
         "inf (identical images)" if acq.get("identical") else acq.get("psnr_db"), PUBLISHED["acq_psnr_db"], "higher"),
    ]
    if tgt:
        be = tgt.get("bone_err_mm") or {}
        rows += [
            (f"Skeletal enclosure at target pose '{tgt.get('pose')}' (%)", tgt.get("enclosure_pct"),
             PUBLISHED["enclosure_target_pct"], "higher"),
            ("Bone placement error at target pose, mean / max (mm)",
             None if not be else f"{be['mean']:.2f} / {be['max']:.2f}", "not measured", "lower"),
            ("DRR SSIM at target pose vs phantom truth", tgt.get("ssim"), "not measured", "higher"),
            ("DRR PSNR at target pose vs phantom truth (dB)", tgt.get("psnr_db"), "not measured", "higher"),
        ]
    return rows


def write_report(out_dir, metrics: dict, sections: list[dict], title: str = "ctwin demo report") -> Path:
    """Write ``report.html``. ``sections``: [{"title", "text", "images": [(relpath, caption)]}].
    ``metrics["warnings"]`` (the twin's, e.g. an implausible fit) are shown in red at the top."""
    out = Path(out_dir)
    rows = "\n".join(
        f"<tr><td>{html.escape(m)}</td><td><b>{_fmt(o)}</b></td><td>{html.escape(str(p))}</td><td>{b}</td></tr>"
        for m, o, p, b in metrics_rows(metrics))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:4px 8px}"
             "figure{display:inline-block;margin:6px;vertical-align:top}figcaption{font-size:90%;color:#555}"
             "img{image-rendering:pixelated;max-width:100%}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             *[f"<p style='color:#b00;font-weight:bold'>WARNING: {html.escape(str(w))}</p>"
               for w in metrics.get("warnings") or []],
             "<h2>Metrics</h2><table><tr><th>metric</th><th>ctwin (this run)</th>"
             "<th>published method</th><th>better</th></tr>", rows, "</table>",
             "<p>Metric definitions: the project SPEC, section 6. The full numbers are in "
             "<code>metrics.json</code>.</p>"]
    for sec in sections:
        parts.append(f"<h2>{html.escape(sec['title'])}</h2>")
        if sec.get("text"):
            parts.append(f"<p>{html.escape(sec['text'])}</p>")
        for rel, cap in sec.get("images", []):
            parts.append(f"<figure><img src='{html.escape(rel)}'><figcaption>{html.escape(cap)}</figcaption></figure>")
    parts.append("</body></html>")
    path = out / "report.html"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(parts))
    return path
