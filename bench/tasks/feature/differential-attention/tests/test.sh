#!/usr/bin/env bash
# Hidden verifier of feature/differential-attention. Usage: bash test.sh <workspace> <tests_dir> <out_dir>.
# feature_pytest.py (bench/harness/verify_lib): first the pristine framework's feature-off outputs
# (test_differential_attention.py pristine, which test_unchanged_when_disabled compares with; failing there is the
# verifier's), then test_differential_attention.py with tests/<framework>/probe.py on the agent's workspace (on
# PithTrain also the pristine framework's own tests, against the agent's code).
exec "${PYTHON:-python3}" "$2/feature_pytest.py" "$@" --pristine test_differential_attention.py
