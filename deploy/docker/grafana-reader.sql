-- Run once by the postgres image at first start (docker-entrypoint-initdb.d): a
-- read-only role for Grafana's "Recent incidents" panel. The tables are created later
-- by the migrations (as "monitor"), so SELECT is granted on the tables it creates.
CREATE ROLE grafana_reader LOGIN PASSWORD 'change-me-too';
GRANT USAGE ON SCHEMA public TO grafana_reader;
ALTER DEFAULT PRIVILEGES FOR ROLE monitor IN SCHEMA public GRANT SELECT ON TABLES TO grafana_reader;
