"""The confirmation stage: after the sweep, the front's best candidates and the base model measured
again on a seed bank the search never saw (`sweep.confirm.seed`), with more samples
(`sweep.confirm.samples`), and the champion decided on those figures and their intervals
(`sweeps.selection.confident_champion`).

Why: the screening figures chose the candidates, so the winner's are biased upward (the best of many
noisy figures: the winner's curse), and at a few hundred samples FID moves more with the seed bank
than the tolerance allows. Figures on fresh noise are not chosen by that noise. The base and every
candidate are sampled from the same bank (sample i from the same noise), so their differences are paired.

What each evaluation measured of each sample is kept under `<sweep>/confirmation/<bank>/`, so that
re-running the selection (`acpo select`) samples nothing again; the intervals are recomputed from it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from sweeps.presets import SweepConfig
from sweeps.selection import ALPHA, QUALITY, Fidelity, confident_champion
from trainers.common import layout, storage
from trainers.common.errors import SelectionError, last_line
from trainers.common.keys import ContentKey
from trainers.config import Config

DIFF = f"{QUALITY}_diff"  # the held-out gain over the base, paired


def in_threads(function, items: list) -> list:
    """`function` over `items` on every core this process may use, in order. For the bootstraps: their
    time is in numpy's linear algebra (FID's covariance and eigenvalues), which releases the GIL, and
    each seeds its own generator, so the figures are those of a loop (measured: 1.7x on 2 cores)."""
    with ThreadPoolExecutor(max(1, len(os.sched_getaffinity(0)))) as pool:
        return list(pool.map(function, items))


def figure_options(fidelity: Fidelity) -> dict:
    """`paired_intervals`' options for the front's fidelity axis: FID's bootstrap or KID's, not both (each
    costs most of an interval's time)."""
    return {"with_fid": fidelity.axis == "fid", "with_kid": fidelity.axis == "kid"}


def screening_intervals(directory: str, rows: list[dict], reference, resamples: int, fidelity: Fidelity = Fidelity()) -> None:
    """Each row's screening figures with intervals, paired with the base on the screening bank, from
    the per-sample data the trial's evaluation stored (`row["intervals"]`; rows of checkpoints without
    it, written before intervals existed, are left as they are)."""
    from eval.intervals import paired_intervals

    base = read_per_sample(layout.base_per_sample_file(directory))
    if base is None:
        return

    def intervals(row):
        data = read_per_sample(storage.join(row["checkpoint"], layout.CHECKPOINT_PER_SAMPLE))
        if data is not None and len(data) == len(base):
            row["intervals"] = paired_intervals(data, reference, base, resamples=resamples, seed=0, **figure_options(fidelity)).to_json()
    in_threads(intervals, rows)


def confirm(config: Config, sweep: SweepConfig, directory: str, front: list[dict], evaluator) -> dict:
    """The confirmation of the first `sweep.confirm.top_k` rows of `front` (in the screening's order):
    the confirmation's record, with per candidate its screening and confirmation figures and p-values,
    and the champion (a candidate's entry, or None). `evaluator`: the screening's
    (`eval.evaluate.Evaluator`); its bank and sample count are replaced by the confirmation's."""
    from eval.intervals import paired_intervals

    settings, fidelity = sweep.confirm, Fidelity.of(sweep)
    candidates = front[: settings.top_k]
    evaluator = confirmation_evaluator(evaluator, sweep)
    bank = bank_name(config, sweep)
    print(f"[sweep] confirming {len(candidates)} candidate(s) and the base model on a fresh seed bank ({settings.samples} samples, "
          f"seed {settings.seed})", flush=True)
    reference = evaluator.reference_features()
    # Sampled one after another (each sampling uses every core), then judged side by side (the bootstraps).
    base = measure(evaluator, base_location(config, sweep, directory), config.model.base, base_model=True, weights_dtype=config.model.weights_dtype)
    measured = [measure(evaluator, storage.join(layout.confirmation_dir(directory), bank, f"{row['trial']}-step{row.get('step', 0)}.safetensors"),
                        row["checkpoint"]) for row in candidates]
    jobs = [lambda: paired_intervals(base, reference, resamples=config.eval.resamples, seed=settings.seed, **figure_options(fidelity))]
    jobs += [lambda data=data: judge(data, base, reference, fidelity, config.eval.resamples, settings.seed) for data in measured]
    base_alone, *judged = in_threads(lambda job: job(), jobs)
    confirmed = [{**{k: row[k] for k in ("trial", "step", "checkpoint") if k in row},
                  "screening": {fidelity.axis: row[fidelity.axis], QUALITY: row[QUALITY], **({"intervals": row["intervals"]} if "intervals" in row else {})},
                  **verdict} for row, verdict in zip(candidates, judged)]
    champion, rule, adjusted = confident_champion(confirmed, fidelity=fidelity)
    for entry, p in zip(confirmed, adjusted):
        entry["p_holm"], entry["passed"] = float(p), bool(p <= ALPHA)
    return {"bank": {"seed": settings.seed, "samples": settings.samples, "steps": evaluator.sampling_steps[0]},
            "base": base_alone.to_json(), "candidates": confirmed, "rule": rule, "alpha": ALPHA,
            "champion": champion}


def confirmation_evaluator(evaluator, sweep: SweepConfig):
    """The screening's `Evaluator` on the confirmation's bank and sample count."""
    return dataclasses.replace(evaluator, samples=sweep.confirm.samples, seed=sweep.confirm.seed)


def bank_name(config: Config, sweep: SweepConfig) -> str:
    """The folder under `<sweep>/confirmation/` of this confirmation's per-sample data. Stored data is
    reused only under the same bank and the same evaluation (reference, extractor, quality models,
    sampler) of the same base model: a study measures its base there once for all its sweeps."""
    settings = sweep.confirm
    settings_key = ContentKey().text(json.dumps({"eval": config.eval.model_dump(), "base": config.model.base}, sort_keys=True)).hex(8)
    return f"seed{settings.seed}-n{settings.samples}-steps{config.eval.sampling_steps[0]}-{settings_key}"


def base_location(config: Config, sweep: SweepConfig, directory: str) -> str:
    """Where the confirmation keeps the base model's per-sample data on its bank."""
    return storage.join(layout.confirmation_dir(directory), bank_name(config, sweep), "base.safetensors")


def judge(data, base, reference, fidelity: Fidelity, resamples: int, seed: int) -> dict:
    """One candidate against the base on the same bank: its figures with paired intervals, the
    bootstrap p-values of "no held-out gain" and of "the fidelity figure beyond the tolerance" (FID
    ratio beyond 1 + tolerance, or KID difference beyond the tolerance), and the 95% lower bound on
    its gain: what `confident_champion` decides on."""
    from eval.intervals import one_sided_p, paired_intervals

    intervals = paired_intervals(data, reference, base, resamples=resamples, seed=seed, **figure_options(fidelity))
    draws = intervals.distributions
    return {"confirmation": intervals.to_json(),
            "p_gain": one_sided_p(draws[DIFF], 0.0, "greater"),
            "p_fidelity": one_sided_p(draws[fidelity.paired], fidelity.paired_limit, "less"),
            "gain_low": float(np.quantile(draws[DIFF], ALPHA))}


def measure(evaluator, location: str, model_location: str, base_model: bool = False, weights_dtype: str = "fp32"):
    """The per-sample data of one model on the confirmation bank: read from `location` when this bank
    measured it before, else sampled and stored there. A base model loads in `weights_dtype` (`model.weights_dtype`)."""
    from eval.intervals import per_sample_bytes

    stored = read_per_sample(location)
    if stored is not None and len(stored) == evaluator.samples:
        return stored
    try:
        if base_model:
            from trainers.models import load_base_model

            evaluation = evaluator.evaluate(load_base_model(model_location, weights_dtype=weights_dtype))
        else:
            from trainers.checkpoint import load_checkpoint_model

            with storage.local_copy(model_location) as local:
                evaluation = evaluator.evaluate(load_checkpoint_model(local))
    except (OSError, ValueError) as error:
        raise SelectionError(f"{model_location}: cannot be sampled for the confirmation ({last_line(error)[:200]})") from None
    first = {evaluator.sampling_steps[0]: evaluation.first}
    storage.write_bytes(location, per_sample_bytes(first))
    return evaluation.first


def read_per_sample(location: str):
    """The first step count's per-sample data stored at `location`, or None when there is none (or it
    is unreadable: then it is measured again)."""
    from eval.intervals import per_sample_from_bytes

    if not storage.is_file(location):
        return None
    try:
        return next(iter(per_sample_from_bytes(storage.read_bytes(location)).values()))
    except Exception:  # noqa: BLE001 - a truncated or foreign file (safetensors' own error type too): measured again
        return None


def interval_text(figure: dict, digits: int = 4) -> str:
    """`value [low, high]`: a figure and its 95% interval."""
    return f"{figure['value']:.{digits}g} [{figure['low']:.{digits}g}, {figure['high']:.{digits}g}]"


def selection_fidelity(selection: dict) -> Fidelity:
    """The fidelity axis and tolerance a selection was made with (FID for one written before it was a choice)."""
    return Fidelity.from_json(selection.get("fidelity"), selection.get("fid_tolerance", 0.1))


def candidate_figures(selection: dict) -> list[dict]:
    """Each confirmed candidate's figures side by side, for the summary, the parent run's note and the
    registered version: its held-out gain over the base on the screening bank (what chose it) and on
    the confirmation bank (with its interval), the shrinkage between the two, and its paired fidelity
    figure (`fidelity`: FID ratio or KID difference, `Fidelity.paired`) on both banks."""
    base, fidelity = selection["base"], selection_fidelity(selection)
    out = []
    for entry in selection.get("confirmation", {}).get("candidates", []):
        confirmed = entry["confirmation"]
        screening_gain = entry["screening"][QUALITY] - base[QUALITY]
        out.append({"trial": entry["trial"], "step": entry.get("step", "?"), "passed": entry["passed"], "p_holm": entry["p_holm"],
                    "screening_fidelity": fidelity.paired_value(entry["screening"], base), "screening_gain": screening_gain,
                    "fidelity": interval_text(confirmed[fidelity.paired]), "gain": interval_text(confirmed[DIFF], 3),
                    "shrinkage": screening_gain - confirmed[DIFF]["value"], "checkpoint": entry["checkpoint"]})
    return out


def summary_lines(selection: dict) -> list[str]:
    """The confirmation in plain text (the sweep's printed summary)."""
    confirmation = selection.get("confirmation")
    if not confirmation:
        return [f"not confirmed: {selection['rule']}"]
    bank, base, fidelity = confirmation["bank"], confirmation["base"], selection_fidelity(selection)
    lines = [f"confirmation on a fresh seed bank (seed {bank['seed']}, {bank['samples']} samples): base {fidelity.label} "
             f"{interval_text(base[fidelity.axis])}, held-out quality {interval_text(base[QUALITY])}",
             f"  {'candidate':<24}{fidelity.paired_label + ' (confirmed)':>30} {'held-out gain: screening':>25} {'confirmed':>30}{'Holm p':>8}"]
    for c in candidate_figures(selection):
        lines.append(f"  {c['trial'] + ' step ' + str(c['step']):<24}{c['fidelity']:>30} {c['screening_gain']:>+25.4f} {c['gain']:>30}"
                     f"{c['p_holm']:>8.3f}{'  passed' if c['passed'] else ''}")
    return lines
