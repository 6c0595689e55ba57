"""RQ workers: queues, job functions, the worker process with its model cache, progress and cancel."""
