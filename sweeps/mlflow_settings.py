"""MLflow's settings for this project's processes, set on import, before mlflow is imported: every
module here that imports mlflow imports this first (`import sweeps.mlflow_settings`). A user's own
value of each variable wins.
"""

import os

# MLflow's usage telemetry (on by default, at `import mlflow`) unsets an environment variable from a
# background thread when it cannot reach its endpoint; a request iterating os.environ at that moment
# (requests' proxy lookup) fails with KeyError '_MLFLOW_TELEMETRY_SESSION_ID'. It took one trial of
# 36 down in a measured study. Off unless the user turns it on; set before mlflow is imported.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# MLflow's client retries a failing request 7 times with exponential backoff (~4 minutes) before it
# raises. Nothing here waits on it: trials spool, and the replay thread has its own retry loop; so a
# call fails within seconds and the replay says the server is down instead of hanging in a retry.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per upload would drown the sweep's log
