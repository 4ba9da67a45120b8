"""Benchmarks against plain k-diffusion, measured in one run.

``python launch/benchmark.py samplers``: samplers on the exact Gaussian-mixture testbed, and the step time
of x0_reproject against k-diffusion's euler on the shapes model.
``python launch/benchmark.py train``: training step time and peak memory of plain k-diffusion image_v1
(a), + gmm_attrs (b), + the NGMG head (c), interleaved, as ratios to (a).
"""
import argparse
import json
from pathlib import Path

from gmmcond.cli import fail_cleanly


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("what", choices=["samplers", "train"])
    parser.add_argument("--out", default="runs/benchmark", help="output folder")
    parser.add_argument("--config", default="shapes", help="recipe whose model times the samplers")
    args = parser.parse_args()

    import torch

    from gmmcond.experiments import benchmarks
    from gmmcond.config import load_config
    from gmmcond.modeling.build import build

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.what == "train":
        result = benchmarks.train_step_time(load_config(args.config))
        (out / "train.json").write_text(json.dumps(result, indent=2))
        t = result["sec_per_step"]
        print(f"batch {result['batch']}, median of {result['repeats']} interleaved rounds of {result['steps']} steps")
        print(f"(a) plain k-diffusion image_v1 + zero mapping_cond: {t['a'] * 1e3:.1f} ms/step, peak {result['peak_rss_mb']['a']:.0f} MiB")
        print(f"(b) + gmm_attrs: {t['b'] * 1e3:.1f} ms/step, ratio {result['ratio_b_to_a']:.3f}; "
              f"peak {result['peak_rss_mb']['b']:.0f} MiB, ratio {result['memory_ratio_b_to_a']:.3f}")
        print(f"(c) + NGMG head: {t['c'] * 1e3:.1f} ms/step, ratio {result['ratio_c_to_a']:.3f}; "
              f"peak {result['peak_rss_mb']['c']:.0f} MiB, ratio {result['memory_ratio_c_to_a']:.3f}")
        print(f"wrote {out / 'train.json'}")
        return
    result = benchmarks.testbed_samplers()
    result["renoise_sweep"] = benchmarks.renoise_sweep()
    torch.manual_seed(0)
    parts = build(load_config(args.config))  # step time does not depend on the weights: an untrained model
    parts.denoiser.eval()
    result["step_time"] = benchmarks.sampler_step_time(parts)
    benchmarks.plot_samplers(result, out / "samplers.png")
    (out / "samplers.json").write_text(json.dumps(result, indent=2))
    print(benchmarks.markdown_table(result))
    print("\nx0_reproject renoise sweep (sliced W1, mode weights, within-mode spread); truth:",
          [[round(v, 3) for v in vs] for vs in result["renoise_sweep"]["true"]])
    for r in result["renoise_sweep"]["runs"]:
        print(f"  r={r['renoise']:.1f} steps={r['steps']:4d} sw1={r['sw1']:.4f} "
              f"weights={[round(v, 3) for v in r['mode_weights']]} spread={[round(v, 3) for v in r['mode_spread']]}")
    st = result["step_time"]
    print(f"\nstep time on the {args.config} model (batch {st['batch']}): x0_reproject {st['sec_per_step']['x0_reproject'] * 1e3:.1f} ms, "
          f"euler {st['sec_per_step']['euler'] * 1e3:.1f} ms, ratio {st['ratio_x0_reproject_to_euler']:.3f}")
    print(f"wrote {out / 'samplers.png'} and {out / 'samplers.json'}")


if __name__ == "__main__":
    fail_cleanly(main)
