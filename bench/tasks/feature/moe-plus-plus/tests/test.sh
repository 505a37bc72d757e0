#!/usr/bin/env bash
# Hidden verifier of feature/moe-plus-plus. Usage: bash test.sh <workspace> <tests_dir> <out_dir>.
# feature_pytest.py (bench/harness/verify_lib): test_moe_plus_plus.py with tests/<framework>/probe.py on the agent's
# workspace; the pristine framework supplies the configs, its own tests, and the models the feature-off check
# compares with.
exec "${PYTHON:-python3}" "$2/feature_pytest.py" "$@"
