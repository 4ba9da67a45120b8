"""Make the fixture ``old_run_9e0624c``: a run trained and sampled by gmmcond as it was before attribute tokens.

tests/test_conditioner.py samples the fixture with today's code and compares with what the old code drew. To remake
it (it should never need remaking; a remade fixture proves nothing unless made at the old commit):

    git worktree add /tmp/old 9e0624c
    PYTHONPATH=/tmp/old python tests/data/make_old_run.py tests/data/old_run_9e0624c

9e0624c is the last commit before 165a8ec, which added `gmm_tokens` and changed how the model builder and the
sampling paths read a condition. The run is the tiny smoke recipe with the default recipe's conditioner, loss and
sampler (x0_reproject at renoise 0.5, CFG 1.5), so the default path is what is held fixed.
"""
import shutil
import subprocess
import sys
from pathlib import Path

import torch

# What the old code is asked, and what the test asks today's code: (name, sets, settings, n).
REQUESTS = [
    ("data", ["circle,red,large", "~square"], {"seed": 5, "precision": "fp32"}, 2),
    ("absent", ["triangle,blue,dark_bg"], {"seed": 7, "precision": "fp32", "open": "absent"}, 2),
    ("plain", ["square,green,left,top"], {"seed": 9, "precision": "fp32", "cfg_scale": 1.0}, 2),
]
OVERRIDES = [
    "train.steps=80",
    "train.checkpoint_every=80",
    "model.self_attn_depths=[false,true]",
    "model.coord_channels=true",
    "conditioner={type: gmm_attrs, dims_per_attr: 4, means: [1.0, 2.0, 3.0], sigma: 0.3, pairing: fixed, "
    "cond_dropout: 0.1}",
    "denoiser.loss=soft_min_snr",
    "sample.sampler={type: x0_reproject, renoise: 0.5}",
    "sample.steps=6",
    "sample.cfg_scale=1.5",
]


def draw(run_dir: Path) -> dict[str, torch.Tensor]:
    """Sample every request of REQUESTS from the run; return {name: images}."""
    from gmmcond.modeling.runs import load_run
    from gmmcond.sampling.sheets import sample_requests

    loaded = load_run(run_dir)
    return {name: sample_requests(loaded, sets, dict(settings), n=n, log=lambda m: None).images
            for name, sets, settings, n in REQUESTS}


def main(out: Path) -> None:
    from safetensors.torch import save_file

    from gmmcond.config import load_config
    from gmmcond.engine.trainer import train

    if out.exists():
        shutil.rmtree(out)
    train(load_config("shapes_tiny", OVERRIDES), out)
    for extra in ("samples", "plots", "train.lock"):  # grids and plots are not what the test reads
        path = out / extra
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    ckpts = sorted((out / "checkpoints").glob("step_*.pt"))
    for old in ckpts[:-1]:
        old.unlink()
    import gmmcond
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(gmmcond.__file__).parent, capture_output=True,
                            text=True).stdout.strip()
    save_file({name: images.contiguous() for name, images in draw(out).items()}, out / "drawn_then.safetensors",
              metadata={"commit": commit, "torch": torch.__version__})


if __name__ == "__main__":
    main(Path(sys.argv[1]))
