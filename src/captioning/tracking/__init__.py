"""Tracking: MLflow run helpers for the stages, and the team's MLflow server.

`runs` finds the tracking URI, names and tags runs, logs data inputs and
per-epoch metrics, and resumes a stage's run; `team_server` starts a
PostgreSQL-backed `mlflow server` with logins for a team.
"""
