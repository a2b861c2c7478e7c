// Azure Data Explorer: the cluster (streaming ingestion on), the database, the schema from
// provision.kql applied as a database script, and database roles: the worker ingests, apps
// and readers view. Nobody but the deployer is an admin.

param location string
param tags object
param clusterName string
param databaseName string
param skuName string
param capacity int
param retention string
param hotCache string
param enablePurge bool

@description('Client (application) ids that ingest: the worker.')
param ingestorClientIds array

@description('Client (application) ids that query: agent apps on a cache miss.')
param viewerClientIds array

@description('[{ principalId, principalType }] extra readers (App client id, Group object id, User UPN).')
param viewers array

param logAnalyticsWorkspaceId string

// The whole schema, idempotent (.create-merge / .create-or-alter / .alter): re-applied when it changes.
var schemaScript = loadTextContent('../../provision.kql')

resource cluster 'Microsoft.Kusto/clusters@2024-04-13' = {
  name: clusterName
  location: location
  tags: tags
  sku: {
    name: skuName
    tier: startsWith(skuName, 'Dev(No SLA)') ? 'Basic' : 'Standard'
    capacity: capacity
  }
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    // The worker streams each batch in one request: seconds from publish to queryable.
    enableStreamingIngest: true
    enableDiskEncryption: true
    enableDoubleEncryption: true
    enablePurge: enablePurge
    // A cluster that stops itself would stall the worker's ingestion.
    enableAutoStop: false
    engineType: 'V3'
    publicNetworkAccess: 'Enabled'
    publicIPType: 'IPv4'
    // The schema uses no external data or plugins: nothing needs to leave the cluster.
    restrictOutboundNetworkAccess: 'Enabled'
    allowedFqdnList: []
    trustedExternalTenants: []
  }
}

resource database 'Microsoft.Kusto/clusters/databases@2024-04-13' = {
  parent: cluster
  name: databaseName
  location: location
  kind: 'ReadWrite'
  properties: {
    softDeletePeriod: retention
    hotCachePeriod: hotCache
  }
}

resource schema 'Microsoft.Kusto/clusters/databases/scripts@2024-04-13' = {
  parent: database
  name: 'provision'
  properties: {
    scriptContent: schemaScript
    forceUpdateTag: uniqueString(schemaScript)
    continueOnErrors: false
  }
}

// Kusto rejects concurrent security changes on one database: assign one at a time, after the schema.
@batchSize(1)
resource ingestors 'Microsoft.Kusto/clusters/databases/principalAssignments@2024-04-13' = [for clientId in ingestorClientIds: {
  parent: database
  name: guid(database.id, clientId, 'Ingestor')
  properties: {
    principalId: clientId
    principalType: 'App'
    role: 'Ingestor'
    tenantId: tenant().tenantId
  }
  dependsOn: [
    schema
  ]
}]

@batchSize(1)
resource appViewers 'Microsoft.Kusto/clusters/databases/principalAssignments@2024-04-13' = [for clientId in viewerClientIds: {
  parent: database
  name: guid(database.id, clientId, 'Viewer')
  properties: {
    principalId: clientId
    principalType: 'App'
    role: 'Viewer'
    tenantId: tenant().tenantId
  }
  dependsOn: [
    ingestors
  ]
}]

@batchSize(1)
resource readers 'Microsoft.Kusto/clusters/databases/principalAssignments@2024-04-13' = [for viewer in viewers: {
  parent: database
  name: guid(database.id, viewer.principalId, 'Viewer')
  properties: {
    principalId: viewer.principalId
    principalType: viewer.principalType
    role: 'Viewer'
    tenantId: tenant().tenantId
  }
  dependsOn: [
    appViewers
  ]
}]

resource diagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: cluster
  properties: {
    workspaceId: logAnalyticsWorkspaceId
    logs: [
      {
        categoryGroup: 'allLogs'
        enabled: true
      }
    ]
    metrics: [
      {
        category: 'AllMetrics'
        enabled: true
      }
    ]
  }
}

output clusterUri string = cluster.properties.uri
output ingestionUri string = cluster.properties.dataIngestionUri
output databaseName string = database.name
