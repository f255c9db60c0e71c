"""`twigvlm-push`: publish a converted TwigVLM folder to the Hub with huggingface_hub."""

import argparse
import json
import sys
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi


DESCRIPTION = """\
Upload a folder written by `twigvlm-convert build` to a Hub model repository, creating the repository if needed.
The token comes from the usual places (the HF_TOKEN environment variable, else the `hf auth login` cache); it is never
printed. Use --dry-run first to see what would be uploaded.
"""
REQUIRED_FILES = ("config.json", "generation_config.json", "README.md")


def files_to_upload(folder: Path) -> list[str]:
    """Every file of the folder, relative paths in upload order; hidden files and folders (.git, .cache) excluded."""
    files = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            files.append(relative.as_posix())
    return files


def check_folder(folder: Path, files: list[str]) -> None:
    """Refuse what is not a complete TwigVLM folder, so that a half-written or wrong folder is never published."""
    missing = [name for name in REQUIRED_FILES if name not in files]
    if not any(name.endswith(".safetensors") for name in files):
        missing.append("*.safetensors")
    if missing:
        raise ValueError(f"{folder} is not a TwigVLM folder written by twigvlm-convert: it lacks {', '.join(missing)}.")
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    if model_type != "twigvlm":
        raise ValueError(f"{folder}/config.json has model_type {model_type!r}, not 'twigvlm'.")


def push(
    folder: Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    dry_run: bool = False,
    api: HfApi | None = None,
) -> list[str]:
    """Upload `folder` to `repo_id` (on branch `revision`, created from the default branch if new); returns the files."""
    folder = Path(folder)
    files = files_to_upload(folder)
    check_folder(folder, files)
    if dry_run:
        return files
    api = api or HfApi()
    # Not private: the account's or organization's default visibility, as on the website.
    api.create_repo(repo_id, repo_type="model", private=private or None, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    api.create_commit(
        repo_id,
        operations=[CommitOperationAdd(path_in_repo=name, path_or_fileobj=folder / name) for name in files],
        commit_message=commit_message or f"Upload {folder.name} (TwigVLM, converted with twigvlm-convert)",
        revision=revision,
        repo_type="model",
    )
    return files


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="twigvlm-push", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", type=Path, help="The TwigVLM folder written by twigvlm-convert build.")
    parser.add_argument("--repo-id", required=True, help="Target model repository, owner/name.")
    parser.add_argument("--private", action="store_true", help="Create the repository as private (if it is new).")
    parser.add_argument(
        "--revision", help="Branch to push to, created from the default branch if missing (default: the main branch)."
    )
    parser.add_argument("--commit-message", help="Commit message (default: one naming the folder).")
    parser.add_argument(
        "--dry-run", action="store_true", help="Check the folder and list the files that would be uploaded; upload nothing."
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        files = push(args.folder, args.repo_id, args.private, args.revision, args.commit_message, args.dry_run)
    except (ValueError, OSError) as error:
        parser.exit(1, f"twigvlm-push: error: {error}\n")
    sizes = {name: (args.folder / name).stat().st_size for name in files}
    target = f"{args.repo_id}@{args.revision or 'main'}"
    print(("Would upload" if args.dry_run else "Uploaded") + f" {len(files)} files to {target}:")
    for name in files:
        print(f"  {name} ({sizes[name]:,} bytes)")
