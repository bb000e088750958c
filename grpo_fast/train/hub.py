"""push_to_hub: upload a folder (the adapter with its model card) to a Hugging Face model repo."""

from __future__ import annotations

from pathlib import Path

from grpo_fast.errors import UserError


class HubError(UserError, RuntimeError):
    """The upload to the Hub failed (no token, no network, no permission): the message names the repo."""


def push_to_hub(folder: str | Path, repo_id: str, *, token: str | None = None, private: bool | None = None,
                commit_message: str = "Upload GRPO LoRA adapter (grpo-fast)") -> str:
    """Create the model repo if needed (create_repo(exist_ok=True)), upload `folder` to its root
    and return the repo's URL. token None = the saved login (`hf auth login`) or HF_TOKEN.
    private None = the Hub's default for a new repo; an existing repo keeps its visibility.
    Any failure is a one-line HubError naming repo_id."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HubError(f"push_to_hub: {str(folder)!r} is not a folder, nothing to upload to {repo_id!r}")
    import huggingface_hub
    import huggingface_hub.constants

    token = token or huggingface_hub.get_token()
    if not token:
        raise HubError(f"push_to_hub: no Hugging Face token to upload to {repo_id!r}: run `hf auth login`, "
                       f"set HF_TOKEN, or pass token=")
    api = huggingface_hub.HfApi(token=token, library_name="grpo-fast")
    try:
        url = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          commit_message=commit_message)
    except Exception as exc:  # HTTP errors, no network, a bad repo id: all end the same way for the user
        lines = str(exc).strip().splitlines()
        reason = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
        raise HubError(f"push_to_hub: uploading {str(folder)!r} to {repo_id!r} failed ({reason})") from None
    return str(getattr(url, "url", None) or url or f"{huggingface_hub.constants.ENDPOINT}/{repo_id}")
