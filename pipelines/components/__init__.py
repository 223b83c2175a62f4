"""KFP v2 components: thin, hermetic wrappers over ``pipelines.core``."""
