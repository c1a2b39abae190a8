"""The statistics behind `trl-bridge compare`'s verdicts: paired t-tests over seeds, Holm–Bonferroni across a table's
comparisons, equivalence by two one-sided tests (TOST), the clean→noisy difference in differences, and a two-level
bootstrap (seeds, then problems) when per-problem records exist.

No scipy: the Student t distribution is computed here from the regularized incomplete beta function (continued
fraction, accurate to ~1e-12), which is all these tests need."""

from __future__ import annotations

import math
import statistics

ALPHA = 0.05
DEFAULT_EQUIVALENCE_MARGIN = 0.03
BOOTSTRAP_SAMPLES = 4000
BOOTSTRAP_SEED = 0


# ----------------------------------------------------------------------------------------------------------------------
# Student t distribution
# ----------------------------------------------------------------------------------------------------------------------
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b)."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc: x must lie in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with `df` degrees of freedom."""
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    if t * t < df:  # near 0: P(|T| < |t|) = I_{t²/(df+t²)}(1/2, df/2) keeps the precision df/(df+t²) would lose
        tail = 0.5 - 0.5 * betainc(0.5, df / 2.0, t * t / (df + t * t))
    else:
        tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def t_quantile(p: float, df: float) -> float:
    """The t value below which lies probability `p` (bisection on `t_sf`; |error| < 1e-9)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p must lie in (0, 1), got {p}")
    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        if 1.0 - t_sf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-10:
            break
    return (lo + hi) / 2


# ----------------------------------------------------------------------------------------------------------------------
# Tests on paired differences (one value per seed)
# ----------------------------------------------------------------------------------------------------------------------
def paired_t(diffs: list[float], alpha: float = ALPHA) -> dict:
    """Mean of the paired differences, its (1 − alpha) t interval and the two-sided p-value of 'mean = 0'.

    With one difference there is no interval and no p-value (None). When every difference is the same the spread is
    0: the interval is that value and p is 1 if it is 0, else 0 (t is infinite)."""
    n = len(diffs)
    if n == 0:
        raise ValueError("paired_t: no paired differences")
    mean = statistics.fmean(diffs)
    if n < 2:
        return {"mean": mean, "n": n, "sd": None, "t": None, "p": None, "ci": None}
    sd = statistics.stdev(diffs)
    se = sd / math.sqrt(n)
    half = t_quantile(1 - alpha / 2, n - 1) * se
    if se == 0:
        t, p = (0.0, 1.0) if mean == 0 else (math.copysign(math.inf, mean), 0.0)
    else:
        t = mean / se
        p = min(1.0, 2 * t_sf(abs(t), n - 1))
    return {"mean": mean, "n": n, "sd": sd, "t": t, "p": p, "ci": [mean - half, mean + half]}


def holm(pvalues: dict[str, float | None]) -> dict[str, float | None]:
    """Holm–Bonferroni adjusted p-values over one family of comparisons (None: no test, left out of the family).

    Sorted ascending p_(1) ≤ ... ≤ p_(m): adjusted p_(i) = max over j ≤ i of min(1, (m − j + 1)·p_(j)). Rejecting
    where the adjusted p < alpha controls the family-wise error rate at alpha."""
    tested = sorted((p, k) for k, p in pvalues.items() if p is not None)
    m, running, out = len(tested), 0.0, {k: None for k in pvalues}
    for i, (p, key) in enumerate(tested):
        running = max(running, min(1.0, (m - i) * p))
        out[key] = running
    return out


def tost(diffs: list[float], margin: float, alpha: float = ALPHA) -> dict:
    """Equivalence of the paired mean to 0 within ±margin by two one-sided t-tests: H0a mean ≤ −margin and H0b
    mean ≥ +margin. Equivalent when both are rejected at alpha, i.e. p = max(p_lower, p_upper) < alpha (the same as
    the (1 − 2·alpha) t interval lying inside (−margin, +margin))."""
    if not margin > 0:
        raise ValueError(f"equivalence margin must be > 0, got {margin}")
    n = len(diffs)
    if n < 2:
        return {"margin": margin, "p_lower": None, "p_upper": None, "p": None, "equivalent": False, "ci90": None}
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    se = sd / math.sqrt(n)
    if se == 0:  # every seed gives the same difference: inside the margin or not, with certainty
        p_lower = 0.0 if mean > -margin else 1.0
        p_upper = 0.0 if mean < margin else 1.0
    else:
        p_lower = t_sf((mean + margin) / se, n - 1)  # H0a: mean <= -margin
        p_upper = 1.0 - t_sf((mean - margin) / se, n - 1)  # H0b: mean >= +margin
    half = t_quantile(1 - alpha, n - 1) * se
    p = max(p_lower, p_upper)
    return {"margin": margin, "p_lower": p_lower, "p_upper": p_upper, "p": p, "equivalent": p < alpha,
            "ci90": [mean - half, mean + half]}


def paired(a: dict, b: dict) -> tuple[list, list[float]]:
    """Seeds present (not None) in both {seed: value} maps, and a − b on each, in seed order."""
    seeds = sorted(k for k in a if k in b and a[k] is not None and b[k] is not None)
    return seeds, [a[k] - b[k] for k in seeds]


def difference_in_differences(clean: dict[str, dict], noisy: dict[str, dict], reference: str, methods: list[str],
                              alpha: float = ALPHA) -> dict:
    """Noise robustness as an interaction. `clean` / `noisy`: method -> {seed: held-out accuracy}.

    For each method, its drop clean − noisy per seed (paired t over seeds). For each method other than `reference`,
    the difference in differences per seed, (clean − noisy)_method − (clean − noisy)_reference = how much more
    (negative: less) the method loses to the noise than the reference, paired t over seeds, Holm over these."""
    drops, out = {}, {"drops": {}, "interaction": {}}
    for method in [reference, *[m for m in methods if m != reference]]:
        if method not in clean or method not in noisy:
            continue
        seeds, d = paired(clean[method], noisy[method])
        if seeds:
            drops[method] = dict(zip(seeds, d))
            out["drops"][method] = {**paired_t(d, alpha), "seeds": seeds, "per_seed": d}
    for method in [m for m in methods if m != reference and m in drops]:
        if reference not in drops:
            break
        seeds, did = paired(drops[method], drops[reference])
        if seeds:
            out["interaction"][method] = {**paired_t(did, alpha), "seeds": seeds, "per_seed": did}
    adjusted = holm({m: v["p"] for m, v in out["interaction"].items()})
    for m, v in out["interaction"].items():
        v["p_holm"] = adjusted[m]
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Two-level bootstrap: seeds, then problems within each drawn seed (paired: the same problems for both methods)
# ----------------------------------------------------------------------------------------------------------------------
def two_level_bootstrap(method: dict, reference: dict, samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED,
                        alpha: float = ALPHA) -> dict:
    """Percentile interval of the mean paired accuracy difference when both seeds and test problems are resampled.

    `method`, `reference`: {seed: [0/1 per problem, in problem order]}; the seeds both have are used, and each pair
    of lists must be of one length. Each replicate draws the seeds with replacement, then for each drawn seed the
    problems with replacement (the same problems for both methods), and averages the differences of accuracy on them.
    Seeded: the same inputs give the same interval."""
    import numpy as np

    seeds = sorted(k for k in method if k in reference)
    if not seeds:
        raise ValueError("two_level_bootstrap: no seed with per-problem records for both methods")
    diffs = []
    for k in seeds:
        a, b = np.asarray(method[k], dtype=float), np.asarray(reference[k], dtype=float)
        if a.shape != b.shape or a.ndim != 1 or not len(a):
            raise ValueError(f"two_level_bootstrap: seed {k}: per-problem records of different or empty lengths "
                             f"({a.shape} vs {b.shape})")
        diffs.append(a - b)
    n_problems = {len(d) for d in diffs}
    if len(n_problems) != 1:
        raise ValueError(f"two_level_bootstrap: the seeds' per-problem records differ in length ({sorted(n_problems)})")
    table = np.stack(diffs)  # seeds x problems: per-problem correctness differences
    rng = np.random.default_rng(seed)
    s, p = table.shape
    seed_idx = rng.integers(0, s, size=(samples, s))
    problem_idx = rng.integers(0, p, size=(samples, s, p))
    replicate = table[seed_idx[:, :, None], problem_idx].mean(axis=(1, 2))
    lo, hi = np.quantile(replicate, [alpha / 2, 1 - alpha / 2])
    return {"mean": float(table.mean()), "ci": [float(lo), float(hi)], "samples": samples, "seed": seed,
            "n_seeds": s, "n_problems": p}


def binomial_se(accuracy: float, n_problems: int) -> float:
    """Standard error of one accuracy measured on `n_problems` problems: sqrt(p(1 − p)/n)."""
    return math.sqrt(accuracy * (1 - accuracy) / n_problems)
