"""The pipeline: params.yaml's config objects, the stage registry, the CLI, many batches, the audit."""
