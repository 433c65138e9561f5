"""The job queue (SQLite) and its workers: what the studio and `dreamloom jobs` use to run trainings."""
