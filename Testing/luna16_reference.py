"""Independent reference for the tests: the FROC arithmetic of LUNA16's ``noduleCADEvaluationLUNA16.py``.

A plain, loop-based transcription of the official script (the later version, with ``excludeList`` and
the 10 mm default diameter for findings with a negative diameter), written separately from
``NoduleDetectionLib.evaluate`` and kept as close to the script's steps as possible:

* ``evaluate_cad``: the script's ``evaluateCAD`` loop: per scan, included annotations then excluded
  ones; a candidate matches when ``dist² < (diameter/2)²``; a found nodule adds ``(1, max probability,
  exclude=False)``, a missed one ``(1, -1e9, exclude=True)``; each remaining candidate ``(0, p, False)``.
* ``compute_froc``: the script's ``computeFROC``: ROC on the non-excluded entries, ``fps = fpr *
  (candidates - detected) / images`` (zeros when there is no false positive), ``sens = tpr * detected /
  lesions``.
* ``roc_curve``: ``sklearn.metrics.roc_curve`` with its defaults (``drop_intermediate=True``), which the
  script calls; transcribed here because sklearn is no dependency of this project.
* ``bootstrap_entries``: the script's ``generateBootstrapSet`` for a given draw of scan indices.

Sensitivities at the 7 FP rates are read with ``numpy.interp(rates, fps, sens)``.
"""

from __future__ import annotations

import math

import numpy as np

FP_RATES = [0.125, 0.25, 0.5, 1, 2, 4, 8]
MIN_PROB_VALUE = -1000000000.0


def roc_curve(y_true, y_score):
    """``sklearn.metrics.roc_curve(y_true, y_score)`` (pos_label 1, no weights, drop_intermediate)."""
    y_true = np.asarray(y_true, dtype=float)
    y_score = np.asarray(y_score, dtype=float)
    desc = np.argsort(y_score, kind="mergesort")[::-1]
    y_score = y_score[desc]
    y_true = y_true[desc]
    distinct = np.where(np.diff(y_score))[0]
    threshold_idxs = np.r_[distinct, y_true.size - 1]
    tps = np.cumsum(y_true)[threshold_idxs]
    fps = 1 + threshold_idxs - tps
    thresholds = y_score[threshold_idxs]
    if len(fps) > 2:
        optimal = np.where(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])[0]
        fps, tps, thresholds = fps[optimal], tps[optimal], thresholds[optimal]
    tps = np.r_[0, tps]
    fps = np.r_[0, fps]
    thresholds = np.r_[np.inf, thresholds]
    with np.errstate(invalid="ignore", divide="ignore"):
        fpr = fps / fps[-1]
        tpr = tps / tps[-1]
    return fpr, tpr, thresholds


def compute_froc(gt_list, prob_list, total_number_of_images, exclude_list):
    """The script's ``computeFROC``."""
    gt_local = []
    prob_local = []
    for i in range(len(exclude_list)):
        if not exclude_list[i]:
            gt_local.append(gt_list[i])
            prob_local.append(prob_list[i])
    number_of_detected = sum(gt_local)
    total_number_of_lesions = sum(gt_list)
    total_number_of_candidates = len(prob_local)
    fpr, tpr, thresholds = roc_curve(gt_local, prob_local)
    if sum(gt_list) == len(gt_list):
        fps = np.zeros(len(fpr))
    else:
        fps = fpr * (total_number_of_candidates - number_of_detected) / total_number_of_images
    sens = (tpr * number_of_detected) / total_number_of_lesions
    return fps, sens, thresholds


def evaluate_cad(series_uids, annotations, excluded, candidates):
    """The script's ``evaluateCAD`` up to the FROC lists.

    ``annotations``/``excluded``: rows ``(seriesuid, x, y, z, diameter_mm)``; ``candidates``: rows
    ``(seriesuid, x, y, z, probability)``. Returns ``(gt_list, prob_list, divisor_list, exclude_list)``.
    """
    all_nodules = {}
    for uid in series_uids:
        nodules = []
        for row in annotations:
            if row[0] == uid:
                nodules.append({"x": row[1], "y": row[2], "z": row[3], "d": row[4], "state": "Included"})
        for row in excluded:
            if row[0] == uid:
                nodules.append({"x": row[1], "y": row[2], "z": row[3], "d": row[4], "state": "Excluded"})
        all_nodules[uid] = nodules
    all_cands = {}
    for uid in series_uids:
        cands = {}
        i = 0
        for row in candidates:
            if row[0] == uid:
                cands[i] = {"x": row[1], "y": row[2], "z": row[3], "p": row[4]}
                i += 1
        all_cands[uid] = cands

    gt_list, prob_list, divisor_list, exclude_list = [], [], [], []
    for uid in series_uids:
        cands = all_cands.get(uid, {})
        cands2 = dict(cands)
        for nod in all_nodules.get(uid, []):
            x, y, z = float(nod["x"]), float(nod["y"]), float(nod["z"])
            diameter = float(nod["d"])
            if diameter < 0.0:
                diameter = 10.0
            radius_squared = pow((diameter / 2.0), 2.0)
            found = False
            matches = []
            for key, cand in cands.items():
                dist = (math.pow(x - float(cand["x"]), 2.) + math.pow(y - float(cand["y"]), 2.)
                        + math.pow(z - float(cand["z"]), 2.))
                if dist < radius_squared:
                    if nod["state"] == "Included":
                        found = True
                        matches.append(cand)
                        if key in cands2:
                            del cands2[key]
                    elif nod["state"] == "Excluded" and key in cands2:  # bOtherNodulesAsIrrelevant
                        del cands2[key]
            if nod["state"] == "Included":
                if found:
                    max_prob = None
                    for cand in matches:
                        if max_prob is None or float(cand["p"]) > max_prob:
                            max_prob = float(cand["p"])
                    gt_list.append(1.0)
                    prob_list.append(float(max_prob))
                    divisor_list.append(uid)
                    exclude_list.append(False)
                else:
                    gt_list.append(1.0)
                    prob_list.append(MIN_PROB_VALUE)
                    divisor_list.append(uid)
                    exclude_list.append(True)
        for _key, cand in cands2.items():
            gt_list.append(0.0)
            prob_list.append(float(cand["p"]))
            divisor_list.append(uid)
            exclude_list.append(False)
    return gt_list, prob_list, divisor_list, exclude_list


def sensitivities(series_uids, annotations, excluded, candidates):
    """Sensitivity at the 7 FP rates and their mean (CPM)."""
    gt, prob, _, exclude = evaluate_cad(series_uids, annotations, excluded, candidates)
    fps, sens, _ = compute_froc(gt, prob, len(series_uids), exclude)
    at = np.interp(FP_RATES, fps, sens)
    return at, float(np.mean(at))


def bootstrap_entries(gt, prob, divisor, exclude, series_uids, draw):
    """The script's ``generateBootstrapSet`` for the scan indices ``draw`` (instead of
    ``np.random.randint``): the concatenated FROC entries of the drawn scans, as three lists."""
    per_scan = {}
    for i in range(len(divisor)):
        per_scan.setdefault(divisor[i], []).append((gt[i], prob[i], exclude[i]))
    out_gt, out_prob, out_exclude = [], [], []
    for idx in draw:
        for g, p, e in per_scan.get(series_uids[idx], []):
            out_gt.append(g)
            out_prob.append(p)
            out_exclude.append(e)
    return out_gt, out_prob, out_exclude
