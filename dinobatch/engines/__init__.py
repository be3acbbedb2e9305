"""Engines: schedulers that run the stages of dinobatch.stages (which process decodes, batching, retries
after a worker's death, progress). The local engine runs them on this machine; see docs/architecture.md."""
