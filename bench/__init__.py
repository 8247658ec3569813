"""bench: suites of optimizer experiments run on Ray Tune, tracked in MLflow, compared with the papers' numbers."""

import os

__version__ = "0.1.0"

# Offline, loopback-only defaults for Ray, set before Ray is imported (it reads them at import).
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes a local Ray instance bind every port to 127.0.0.1.
for _key, _value in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_CHDIR_TO_TRIAL_DIR": "0", "RAY_AIR_NEW_OUTPUT": "0",
                     "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}.items():
    os.environ.setdefault(_key, _value)
