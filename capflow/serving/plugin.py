"""Registers the built-in servings, exactly as a third-party plugin would."""

from capflow.hookspecs import hookimpl
from capflow.serving.batch_file import BatchFileServing
from capflow.serving.openai import OpenAIServing
from capflow.serving.openai_batch import OpenAIBatchServing


@hookimpl
def capflow_register_servings(register):  # noqa: ANN001 - see capflow.hookspecs
    register("openai", OpenAIServing)
    register("openai_batch", OpenAIBatchServing)
    register("batch_file", BatchFileServing)
