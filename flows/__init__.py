"""Prefect flows over the wsipipe library: ``flows.slide.process_slide`` and
``flows.archive.process_archive``. They only wire library calls to tasks; see prefect.yaml.

Importing this package first makes Prefect quiet and offline-safe (no telemetry, a patient
ephemeral server start on a busy machine) unless the environment already says otherwise.
"""

import os

OFFLINE_DEFAULTS = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "wsipipe",
}
for _key, _value in OFFLINE_DEFAULTS.items():
    os.environ.setdefault(_key, _value)
