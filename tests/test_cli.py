"""The CLI against a live server: the commands a person types."""
from __future__ import annotations

from streamrec.cli import main


def run(capsys, *argv) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_load_send_and_recommend(server, client, tmp_path, capsys):
    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id,type,value,timestamp\n"
                   "cli-user,i10,purchase,,1700000000\n"
                   "cli-user,brand-new-item,click,,1700000001\n"
                   "cli-user,i11,rating,5,1700000002\n")
    address = ["--address", server.address]
    out = run(capsys, "load", str(log), "--create-items", "--id-prefix", "cli-", *address)
    assert "created 1 unknown item(s)" in out and "3 accepted" in out and "0 rejected" in out
    assert "3 duplicate" in run(capsys, "load", str(log), "--id-prefix", "cli-", *address)
    assert client.get_user("cli-user").event_count == 3
    assert "1 accepted" in run(capsys, "send-events", "--user", "cli-user", "--item", "i12", "--type", "click", *address)
    out = run(capsys, "recommend", "cli-user", "-k", "3", *address)
    assert out.startswith("personalized recommendations for cli-user") and len(out.strip().splitlines()) == 4
    assert "SERVING" in run(capsys, "health", *address)
    assert '"items"' in run(capsys, "stats", *address)


def test_cli_reports_errors_with_the_status(server, capsys):
    assert main(["recommend", "someone", "-k", "0", "--address", server.address]) == 1
    assert "INVALID_ARGUMENT: k:" in capsys.readouterr().err
