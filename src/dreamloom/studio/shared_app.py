"""`dreamloom studio` with a login (a password was given, or it listens beyond this machine): the
same pages (app.py), served by Streamlit's `st.App` with the login gate in front of every route."""

import os
from pathlib import Path

import streamlit as st
from starlette.middleware import Middleware

from dreamloom.studio.login import HASH_ENV, LoginGate, sessions_from_env

app = st.App(Path(__file__).with_name("app.py"),
             middleware=[Middleware(LoginGate, password_hash=os.environ[HASH_ENV], sessions=sessions_from_env())])
