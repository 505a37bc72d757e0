#!/usr/bin/env bash
# Hidden verifier of feature/moba-attention. Usage: bash test.sh <workspace> <tests_dir> <out_dir>.
# feature_pytest.py (bench/harness/verify_lib): the shared property tests test_moba.py with tests/<framework>/probe.py
# on the agent's workspace ($PYTHON also runs TorchTitan's training; on PithTrain also the framework's own tests).
# The pristine framework gives the reference logits of the unchanged model and the training config.
exec "${PYTHON:-python3}" "$2/feature_pytest.py" "$@"
