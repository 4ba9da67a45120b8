#!/usr/bin/env bash
# Create .venv and install gmmcond with its test and tensorboard extras. torch/torchvision are pinned to the builds that
# import together on CPU machines (k-diffusion needs torchvision); see README "Quickstart".
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 'setuptools<81'
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -e '.[test,tensorboard]'
