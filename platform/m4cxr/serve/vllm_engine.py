"""The serving side of the vLLM engine (model/vllm_engine.py): a route's sampling settings as
vLLM's, answers streamed as the HF engine streams them, and vLLM's errors as the client's 4xx/5xx."""

from __future__ import annotations

from typing import Any, AsyncIterator

from m4cxr.model.vllm_engine import VLLMEngine
from m4cxr.serve.inputs import RequestError
from m4cxr.serve.openai_chat import Sampling


def sampling_params(sampling: Sampling, stream: bool):
    """vLLM's settings for a request; greedy asks for one answer (vLLM refuses n > 1 there), which
    `generate` repeats n times."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        n=1 if sampling.greedy else sampling.n, max_tokens=sampling.max_tokens, temperature=sampling.temperature,
        top_p=sampling.top_p if not sampling.greedy else 1.0, seed=sampling.seed, stop=list(sampling.stop) or None,
        output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY)


def finish(output, prompt_tokens: int) -> dict[str, Any]:
    """A vLLM completion as the details the routes report (model/m4cxr.py generate_details)."""
    return {"text": output.text.strip(), "prompt_tokens": prompt_tokens, "completion_tokens": len(output.token_ids),
            "finish_reason": "length" if output.finish_reason == "length" else "stop"}


class ServingEngine(VLLMEngine):
    async def generate(self, checkpoint: str, embeds, sampling: Sampling, stream: bool = False) -> AsyncIterator:
        """Stream: the text pieces as they come, then the details (a dict). Otherwise: one list
        with the details of the n answers. The text is stripped as the HF engine strips it:
        leading and trailing white space never reach the client."""
        from vllm.exceptions import VLLMValidationError
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            async for item in self.answers(checkpoint, embeds, sampling, stream):
                yield item
        except VLLMValidationError as err:  # vLLM's own refusal of the request is the client's 400
            raise RequestError(f"the engine refused the request: {err}") from err
        except EngineDeadError as err:  # its process died: Serve's health check replaces the replica
            raise RequestError("the model's engine stopped; its replica is being replaced, retry shortly", 503) from err

    async def answers(self, checkpoint: str, embeds, sampling: Sampling, stream: bool) -> AsyncIterator:
        """generate(), without the translation of vLLM's errors."""
        last, tokens, sent, held = None, 0, False, ""
        async for out in self.stream(checkpoint, embeds, sampling_params(sampling, stream)):
            last = out
            if stream:
                tokens += len(out.outputs[0].token_ids)
                text = held + out.outputs[0].text
                if not sent:
                    text = text.lstrip()
                piece = text.rstrip()
                held = text[len(piece):]  # white space is sent only when more text follows it
                if piece:
                    sent = True
                    yield piece
        if last is None:
            raise RuntimeError("the engine returned nothing")
        prompt_tokens = len(embeds)
        if stream:
            yield {"prompt_tokens": prompt_tokens, "completion_tokens": tokens,
                   "finish_reason": "length" if last.outputs[0].finish_reason == "length" else "stop"}
        else:
            done = [finish(o, prompt_tokens) for o in sorted(last.outputs, key=lambda o: o.index)]
            yield done * sampling.n if len(done) == 1 else done
