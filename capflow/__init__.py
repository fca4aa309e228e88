"""capflow: caption and question large image datasets with vision-language models behind any
OpenAI-compatible chat-completions API.

The Python API mirrors the CLI::

    from capflow.storage import FileStorage
    from capflow.serving import OpenAIServing
    from capflow.operators import PromptedVQAGenerator
"""

from capflow.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["__version__", "hookimpl"]
