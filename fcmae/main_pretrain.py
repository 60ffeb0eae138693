"""Deprecated module path, kept for scripts: `python -m fcmae.main_pretrain` runs fcmae.pretrain.main."""

if __name__ == "__main__":  # as in fcmae.pretrain.main: catch a stop signal during the slow imports
    from fcmae.runtime.signals import install_stop_handler

    install_stop_handler()

from fcmae.pretrain.main import SPEC, main  # noqa: E402,F401

if __name__ == "__main__":
    main()
