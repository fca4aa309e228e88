"""Servings: each turns one request into one response."""

from capflow.serving.base import Serving
from capflow.serving.openai import OpenAIServing
from capflow.serving.openai_batch import OpenAIBatchServing

__all__ = ["OpenAIBatchServing", "OpenAIServing", "Serving"]
