"""The data of the report's ASR-vs-preservation plot (`plot_panels`): one panel per table and measure, one point per
table row; `plot.asr_preservation_plot` draws it."""

from __future__ import annotations


def plot_panels(tables: list[dict]) -> list[dict]:
    panels = []
    for t in tables:
        if t["kind"] == "shapeworld":
            pts = [{"label": r["label"], "original": r["original"], "y": r["summary"]["asr"],
                    "y_ci": r["summary"]["asr_ci"], "acc": r["summary"].get("accuracy"), "fd": r["summary"].get("fd"),
                    "base": r.get("base")} for r in t["rows"] if r["summary"].get("asr") is not None]
            # each row against its own base model's original (rows of another base have another baseline)
            baselines = {}
            for p in pts:
                if p["original"] and p["acc"] is not None:
                    baselines.setdefault(p["base"], p["acc"])
            with_acc = [p for p in pts if p["acc"] is not None]
            base = baselines if with_acc and all(p["base"] in baselines for p in with_acc) else None
            acc_pts = []
            for p in with_acc:
                x = 1.0 - (base[p["base"]] - p["acc"]) if base is not None else p["acc"]
                acc_pts.append({"label": p["label"], "original": p["original"], "x": x, "y": p["y"], "y_ci": p["y_ci"]})
            y_label = "ASR (keyword + synonym + paraphrase)"
            if acc_pts:
                panels.append({
                    "table": t["id"], "title": f"{t['suite']}: ASR vs preservation accuracy",
                    "x_label": (f"1 − accuracy drop vs {'each base model’s' if len(base) > 1 else 'the'} original "
                                "(preserve + unrelated)" if base is not None
                                else "mean preservation accuracy (preserve + unrelated)"),
                    "y_label": y_label, "x_kind": "rate", "x_better": "higher",
                    "series": [{"name": "ASR", "points": acc_pts}]})
            fd_pts = [{"label": p["label"], "original": p["original"], "x": 0.0 if p["original"] else p["fd"],
                       "y": p["y"], "y_ci": p["y_ci"]} for p in pts if p["original"] or p["fd"] is not None]
            if any(not p["original"] for p in fd_pts):
                panels.append({"table": t["id"], "title": f"{t['suite']}: ASR vs Fréchet distance",
                               "x_label": "FD to the original model's images (original = 0)", "y_label": y_label,
                               "x_kind": "number", "x_better": "lower",
                               "series": [{"name": "ASR", "points": fd_pts}]})
        else:
            rows = [r for r in t["rows"] if r["summary"].get("asr") is not None or r["summary"].get("adv") is not None]
            if not rows:
                continue
            if any(r["summary"]["fid"] is not None for r in rows):
                xk, x_label, better = "fid", "FID to the original model (original = 0)", "lower"
            elif any(r["summary"]["clip_score"] is not None for r in rows):
                xk, x_label, better = "clip_score", "CLIP score", "higher"
            else:
                xk, x_label, better = None, "", None
            if xk is None and len(rows) < 2:
                continue  # one model and no preservation number: nothing to compare
            series = []
            head = t["suite_labels"].get(rows[0]["summary"]["asr_suite"] or "", "ASR")
            for name, key in ((head, "asr"), ("Adv", "adv")):
                pts = []
                for i, r in enumerate(rows):
                    y = r["summary"].get(key)
                    if y is None:
                        continue
                    if xk is None:
                        x = float(i)
                    else:
                        x = r["summary"][xk]
                        if x is None and xk == "fid" and r["original"]:
                            x = 0.0
                        if x is None:
                            continue
                    pts.append({"label": r["label"], "original": r["original"], "x": x, "y": y,
                                "y_ci": r["summary"]["asr_ci"] if key == "asr" else None})
                if pts:
                    series.append({"name": name, "points": pts})
            if series:
                panels.append({"table": t["id"], "title": "Real suites: ASR vs preservation" if xk
                               else "Real suites: ASR per model", "x_label": x_label, "y_label": "ASR",
                               "x_kind": "number" if xk else "category", "x_better": better,
                               "categories": [r["label"] for r in rows] if xk is None else None, "series": series})
    return panels
