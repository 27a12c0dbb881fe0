"""Where jobs run: settings, persistence (tables, object store), the job lifecycle, the run context
backed by them, `run_job`, and the executors that decide where it runs."""
