"""The one Spark session builder for the project's Spark jobs (feature extraction, batch captioning).

`spark_session(master)` returns the active session when there is one (a test's
`local[2]` session, or the one `spark-submit` made, whose master wins), else
builds one with the settings both jobs rely on: Arrow for pandas UDFs, Python
workers reused between tasks (so a TensorFlow model loaded by one task serves
the next on that executor), and the driver's own interpreter for the workers
in local mode (so `local[*]` runs in the venv it was started from). pyspark is
imported here and only here, when a job asks for a session, so the rest of the
package imports without it.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


def spark_session(master: str, app_name: str = "captioning") -> SparkSession:
    """The active Spark session, or a new one on `master` (local[*], spark://..., yarn)."""
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    if master.startswith("local"):
        # Workers of a local master are children of this process: same interpreter,
        # same environment. On a cluster, PYSPARK_PYTHON comes from spark-submit's conf.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    return (
        SparkSession.builder.master(master)
        .appName(app_name)
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.python.worker.reuse", "true")
        # One task per core and nothing else running beside a TF model that uses the cores.
        .config("spark.task.cpus", "1")
        .config("spark.ui.showConsoleProgress", "false")
        .getOrCreate()
    )
