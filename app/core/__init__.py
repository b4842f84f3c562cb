"""The service core: settings, the database and its models, the job state machine, job creation,
storage, the queue, which backbones a job may name. No HTTP here: the API (app.api) and the worker
(worker/) both build on it, and a core error (app.core.errors) says what went wrong, not which
status code to answer with.
"""
