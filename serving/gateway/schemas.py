"""The OpenAI-style requests the gateway relays, as it checks them, and its OpenAI-style errors."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from serving.observability import StreamTally


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool | None = None


class RelayedRequest(BaseModel):
    """What the gateway reads of every relayed request: the model, which routes it. Unknown
    fields pass through to the engine, which knows its own extensions. Strict: a "16" for
    max_tokens or "yes" for stream is refused, as OpenAI's API and vLLM refuse it, not read
    as 16 or true."""

    model_config = ConfigDict(extra="allow", strict=True)

    # Whether the route's shadow may copy it (serving/shadow.py scores completions only).
    shadowed: ClassVar[bool] = False
    # What marks an event that carries a generated token, in a relayed stream.
    token_event: ClassVar[bytes] = StreamTally.EVENT

    model: str = Field(min_length=1)

    def streamed(self) -> bool:
        """Whether the engine answers it as a stream of events (a method: a client's
        `stream` field on an endpoint that does not stream is only passed through)."""
        return False

    def choices(self) -> int:
        """How many completions the engine computes for it (prompts x n): the slots it takes
        of the in-flight limit, and what gateway.max_choices_per_request bounds."""
        return 1


class _OpenAIRequest(RelayedRequest):
    shadowed: ClassVar[bool] = True

    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None

    def streamed(self) -> bool:
        return self.stream

    def choices(self) -> int:
        # vLLM 0.32 has no best_of on these endpoints (it ignores the field); beam search's
        # width is n, counted here.
        return self.n or 1


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[str] | list[int] | list[list[int]]

    def prompts(self) -> int:
        """A string or a list of token ids is one prompt; a list of either, one each."""
        prompt = self.prompt
        if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
            return 1
        return len(prompt)

    def choices(self) -> int:
        return self.prompts() * (self.n or 1)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[Any] | None = None


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def _refused(kind: str, message: str):
    """A validator's refusal, in the client's words: no pydantic "Value error, " before it."""

    def check(value: Any) -> Any:
        if value is not None and value is not False:
            raise PydanticCustomError(kind, message)
        return value

    return check


class ResponsesRequest(RelayedRequest):
    """OpenAI's Responses API (vLLM's /v1/responses). Only what routing needs is checked;
    the rest is the engine's to check.

    Refused: what would make the answer depend on state one replica keeps. vLLM 0.32 keeps a
    stored response in its own process's memory, and only when the engine runs with
    VLLM_ENABLE_RESPONSES_API_STORE=1 (its entrypoints/openai/responses/serving.py; otherwise
    `store` is ignored), which serving/replica.py turns off: a `previous_response_id` could
    only be found on the replica that answered it, which the gateway cannot send the request
    to, and a `background` response can only be polled there. `store` itself passes: the
    engine ignores it."""

    token_event: ClassVar[bytes] = b"event: response.output_text.delta"

    stream: bool | None = None
    previous_response_id: Annotated[
        str | None,
        AfterValidator(
            _refused(
                "stateful",
                "not supported by this gateway: responses are not stored (each replica "
                "would keep its own, and the next request may go to another). Send the "
                "conversation so far in `input` instead",
            )
        ),
    ] = None
    background: Annotated[
        bool | None,
        AfterValidator(
            _refused(
                "stateful",
                "not supported by this gateway: a background response is kept by one "
                "replica, and polling may reach another. Send the request without "
                "`background`, or stream it",
            )
        ),
    ] = None

    def streamed(self) -> bool:
        return bool(self.stream)


class TokenizeRequest(RelayedRequest):
    """vLLM's /tokenize: a prompt, or chat messages rendered with the model's template."""

    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise PydanticCustomError(
                "prompt_or_messages", "give one of `prompt` (a string) and `messages`"
            )
        return self


class DetokenizeRequest(RelayedRequest):
    """vLLM's /detokenize: token ids back to text."""

    tokens: list[Annotated[int, Field(ge=0)]]


def openai_error_body(
    message: str,
    *,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def openai_error(
    status: int,
    message: str,
    *,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> JSONResponse:
    return JSONResponse(
        status_code=status, content=openai_error_body(message, type_=type_, param=param, code=code)
    )


RELAYED: dict[str, type[RelayedRequest]] = {
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/responses": ResponsesRequest,
    "/tokenize": TokenizeRequest,
    "/detokenize": DetokenizeRequest,
}
