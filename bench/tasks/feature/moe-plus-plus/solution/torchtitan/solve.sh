#!/usr/bin/env bash
# Oracle of feature/moe-plus-plus on TorchTitan: apply.py adds MoE++ to the workspace's TorchTitan (MoEArgs, router,
# MoE, the DeepSeek-V3 decoder loop) and the tiny_moepp flavor to ate_run; it stops with a message if TorchTitan no
# longer has the code it hooks into. The hidden verifier builds, trains and compares the result itself.
set -euo pipefail
cd "${ATE_WORKSPACE:-.}"
"${PYTHON:-python3}" "${ATE_SOLUTION:-$(dirname "$0")}/apply.py" .
