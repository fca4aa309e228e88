"""Servings: each turns one request into one response."""

from capflow.serving.base import Serving
from capflow.serving.openai import OpenAIServing

__all__ = ["OpenAIServing", "Serving"]
