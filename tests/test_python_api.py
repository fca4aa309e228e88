"""The seed's complete pipeline (its section 4), written line for line against capflow."""

from __future__ import annotations

import json
import os
import shutil
from importlib import resources

from conftest import expected_caption

from capflow.testing.server import FakeOpenAIServer


def test_seed_pipeline_line_for_line(tmp_path, monkeypatch):
    sample = resources.files("capflow.data") / "sample"
    shutil.copytree(str(sample), tmp_path / "example_data" / "image_caption")
    monkeypatch.chdir(tmp_path)
    with FakeOpenAIServer(api_key="sk-xxx") as server:
        api_url = server.base_url

        # ---- the seed's code, with capflow's imports and a loopback api_url ----
        os.environ["DF_API_KEY"] = "sk-xxx"
        from capflow.operators import PromptedVQAGenerator
        from capflow.serving import OpenAIServing
        from capflow.serving import Serving as LLMServingABC
        from capflow.storage import FileStorage

        class ImageCaptionPipeline:
            """
            Complete batch image caption generation with a single command.
            """

            def __init__(self, llm_serving: LLMServingABC = None):
                # ---------- 1. Storage ----------
                self.storage = FileStorage(
                    first_entry_file_name="./example_data/image_caption/sample_data.json",
                    cache_path="./cache_local",
                    file_name_prefix="caption",
                    cache_type="json",
                )
                # ---------- 2. Serving ----------
                self.vlm_serving = OpenAIServing(
                    api_url=api_url,
                    key_name_of_api_key="DF_API_KEY",
                    model_name="gpt-5-nano-2025-08-07",
                    send_request_stream=False,
                    max_workers=10,
                    timeout=1800,
                )
                # ---------- 3. Operator ----------
                self.vqa_generator = PromptedVQAGenerator(
                    serving=self.vlm_serving,
                    system_prompt="You are a image caption generator. Your task is to generate"
                    " a concise and informative caption for the given image content.",
                )

            def forward(self):
                input_image_key = "image"
                output_answer_key = "caption"
                return self.vqa_generator.run(
                    storage=self.storage.step(),
                    input_conversation_key="conversation",
                    input_image_key=input_image_key,
                    output_answer_key=output_answer_key,
                )

        pipe = ImageCaptionPipeline()
        summary = pipe.forward()
        # ------------------------------------------------------------------------
        monkeypatch.delenv("DF_API_KEY")
        assert {r.headers["Authorization"] for r in server.requests} == {"Bearer sk-xxx"}
        assert {r.model for r in server.requests} == {"gpt-5-nano-2025-08-07"}
        assert server.requests[0].system.startswith("You are a image caption generator.")

    assert summary.done == 6 and summary.failed == 0
    rows = json.loads((tmp_path / "cache_local" / "caption_step1.json").read_text())
    source = json.loads((sample / "sample_data.json").read_text())
    assert [{k: v for k, v in r.items() if k != "caption"} for r in rows] == source
    for row in rows:
        image = tmp_path / "example_data" / "image_caption" / row["image"][0]
        assert row["caption"] == expected_caption(image)
