"""The itsd worker: ONNX Runtime pipelines and the Celery edit task. Never imports torch."""
