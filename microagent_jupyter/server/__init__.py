"""jupyter-server extension: the microagent REST API under ``<base_url>/microagent/api/``."""

from __future__ import annotations

from typing import Any

from .config import MicroagentConfig


def load_jupyter_server_extension(serverapp: Any) -> None:
    from .handlers import setup_handlers
    from .kernels import prefill_kernel_pools, sync_on_save

    config = MicroagentConfig(parent=serverapp)
    setup_handlers(serverapp.web_app, config)
    serverapp.contents_manager.register_post_save_hook(sync_on_save)
    serverapp.log.info("microagent: REST API at %smicroagent/api/ (state dir %s)",
                       serverapp.web_app.settings.get("base_url", "/"),
                       serverapp.web_app.settings["microagent_engine"].state_dir)
    prefill_kernel_pools(serverapp)


__all__ = ["MicroagentConfig", "load_jupyter_server_extension"]
